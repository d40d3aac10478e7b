"""Samples at evaluation (``generate_during_eval``): policy and reference completions, side by side.

For the first ``num_generations`` eval prompts, one policy completion and one reference completion
of at most ``max_new_tokens`` tokens each, sampled (``do_sample=True`` with the model's generation
config, as TRL's trainers generate) under a fixed seed per prompt (``seed + index``), so the two
columns are comparable and a run gives the same samples again. The global RNG state is kept as it
was: training does not notice the samples.

Where the model is sharded (FSDP2, DeepSpeed ZeRO-3) every rank generates the same prompts with
``synced_gpus=True`` (each forward gathers shards from every rank); elsewhere the main process
generates alone. Only the main process writes ``samples/step-N.jsonl`` and logs to the trackers
(tensorboard: a markdown table through ``add_text``; wandb: a ``wandb.Table``).

Generation runs with the model's standard attention (sdpa); prefixpo's prefix-sharing attention
is switched back on afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixpo.modeling import ATTENTION_FUNCTIONS, set_attention_function, unwrap

COLUMNS = ("step", "prompt", "policy", "reference")


@dataclass
class SampleModel:
    """A model to sample from: ``model`` as the run holds it (possibly in a DDP, FSDP2 or DeepSpeed
    wrapper) and ``context``, entered around generation (the policy with adapters off, for a LoRA
    reference)."""

    model: nn.Module
    context: Callable[[], AbstractContextManager[Any]] = nullcontext


def attach(reference_fn: Any, model: nn.Module, context: Callable[[], AbstractContextManager[Any]] = nullcontext) -> Any:
    """Record on a reference function the model it runs, for samples; returns the function."""
    reference_fn.sample_model = SampleModel(model, context)
    return reference_fn


def sample_model_of(reference_fn: Any) -> SampleModel | None:
    """The reference model to sample from; None for no reference or a precomputed one."""
    return getattr(reference_fn, "sample_model", None)


def adapters_off(model: nn.Module) -> Callable[[], AbstractContextManager[Any]]:
    """A context that disables the PEFT adapters found inside ``model``'s wrappers."""
    peft_model = model
    while not hasattr(peft_model, "disable_adapter"):
        peft_model = getattr(peft_model, "module", None) or getattr(peft_model, "model", None)
        if peft_model is None:
            raise ValueError("a reference from disabled adapters needs a PEFT model")
    return peft_model.disable_adapter


def _fsdp_root(model: nn.Module) -> nn.Module | None:
    """``model`` when it is an FSDP2 module (its root parameters need an explicit unshard, since
    generation calls the transformers model inside it, not its forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        return None
    return model if isinstance(model, FSDPModule) else None


@contextmanager
def standard_attention(model: nn.Module) -> Iterator[nn.Module]:
    """The transformers model inside ``model``, with sdpa attention and in eval mode for the
    duration; FSDP2 root parameters gathered. Prefix-sharing attention and the mode come back after."""
    inner = unwrap(model)
    backend = getattr(inner, "_prefixpo_backend", None)
    was_training = inner.training
    root = _fsdp_root(model)
    set_attention_function(inner, "sdpa")
    inner.eval()
    if root is not None:
        root.unshard()
    try:
        yield inner
    finally:
        if root is not None:
            root.reshard()
        inner.train(was_training)
        if backend is not None:
            set_attention_function(inner, ATTENTION_FUNCTIONS[backend])


@torch.no_grad()
def complete(model: SampleModel, prompts: Sequence[Sequence[int]], seed: int, max_new_tokens: int,
             pad_token_id: int | None, synced: bool = False) -> list[list[int]]:
    """The sampled completion token ids of each prompt; prompt ``i`` under seed ``seed + i``."""
    outputs = []
    with model.context(), standard_attention(model.model) as inner:
        device = next(inner.parameters()).device
        devices = [device] if device.type == "cuda" else []
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([list(prompt)], device=device)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + i)
                out = inner.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=True, pad_token_id=pad_token_id, use_cache=True,
                                     synced_gpus=synced)
            outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def sample_rows(policy: nn.Module, reference: SampleModel | None, tokenizer: Any, prompts: Sequence[Sequence[int]],
                step: int, seed: int, max_new_tokens: int, synced: bool = False) -> list[dict[str, Any]]:
    """One record per prompt: step, prompt, policy and reference completions (reference None
    when the run has no reference model)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy_ids = complete(SampleModel(policy), prompts, seed, max_new_tokens, pad, synced)
    reference_ids = (complete(reference, prompts, seed, max_new_tokens, pad, synced) if reference is not None
                     else [None] * len(prompts))

    def text(ids: list[int] | None) -> str | None:
        return None if ids is None else tokenizer.decode(ids, skip_special_tokens=True)

    return [{"step": step, "prompt": tokenizer.decode(list(p)), "policy": text(a), "reference": text(b)}
            for p, a, b in zip(prompts, policy_ids, reference_ids)]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (tensorboard's text plugin renders it).

    >>> print(markdown_table([{"step": 2, "prompt": "a|b", "policy": "x\\ny", "reference": None}]))
    | step | prompt | policy | reference |
    |---|---|---|---|
    | 2 | a\\|b | x<br>y | *none* |
    """

    def cell(value: Any) -> str:
        if value is None:
            return "*none*"
        return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def log_rows(rows: Sequence[dict[str, Any]], step: int, accelerator: Any, reports: Sequence[str]) -> None:
    """Log the rows to the run's trackers: tensorboard text ``eval/samples`` (a markdown table),
    wandb table ``eval/samples`` (columns step, prompt, policy, reference)."""
    if "tensorboard" in reports:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_text("eval/samples", markdown_table(rows), global_step=step)
        writer.flush()
    if "wandb" in reports:
        import wandb

        table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
        accelerator.get_tracker("wandb", unwrap=True).log({"eval/samples": table}, step=step)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s forward gathers shards from every rank (FSDP2, DeepSpeed ZeRO-3)."""
    if _fsdp_root(model) is not None:
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 partitioned parameters


def eval_samples(policy: nn.Module, reference_fn: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], step: int,
                 cfg: Any, accelerator: Any, out: Path) -> list[dict[str, Any]] | None:
    """Every rank calls it at an evaluation with ``generate_during_eval``. The main process writes
    ``out/samples/step-N.jsonl`` and logs to ``cfg.reports``; returns the rows there (None elsewhere)."""
    reference = sample_model_of(reference_fn)
    synced = is_sharded(policy) or (reference is not None and is_sharded(reference.model))
    main = accelerator.is_main_process
    rows = None
    if main or synced:
        rows = sample_rows(policy, reference, tokenizer, prompts, step, cfg.seed, cfg.max_new_tokens, synced)
    if main:
        write_rows(rows, out / "samples" / f"step-{step}.jsonl")
        log_rows(rows, step, accelerator, cfg.reports)
    return rows if main else None
