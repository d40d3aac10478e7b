"""``prefixpo train``: SFT and preference training, one stage after another, on accelerate.

The loop reads top to bottom (``train_stage``): load the tokenizer, the data and the model,
switch the model to prefix-shared attention, build the reference, then for every optimizer
step lay out and (optionally) pack its groups, run ``preference_step`` or ``sft_step``, clip,
step the optimizer and the schedule, and log, evaluate and checkpoint on schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixpo.config import ConfigError, TrainConfig, load_stages, save_config
from prefixpo.layout import Batch, Group, build_batch, layout_group, round_up
from prefixpo.packing import PackingConfig, bucket_lengths, packing_stats, plan_epoch, row_length
from prefixpo.rundir import DONE_MARKER, RunLock, clear_run, finished_record, plan_stages


class TrainingError(RuntimeError):
    """Training stopped on purpose; the message says why and what was kept. ``exit_code``: what
    ``prefixpo train`` exits with (1; 128 + the signal's number when a signal stopped it)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before they kill a job) during
    training are remembered, not acted on at once: the loop finishes its step, saves a checkpoint
    and stops, so a checkpoint never holds a half-applied optimizer step. A second signal stops at
    once, without saving. Installed only in the main thread (where Python delivers signals).

    >>> with StopSignals() as stop:
    ...     signal.raise_signal(signal.SIGTERM)
    ...     stop.name, stop.exit_code
    ('SIGTERM', 143)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: the user means now
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or signal.SIGINT)


# --- loading ------------------------------------------------------------------------------------

def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(cfg: TrainConfig, tokenizer, evaluation: bool = False) -> list[Group]:
    """The train (or eval) groups of every dataset of ``dataset`` (``eval_dataset``), concatenated;
    each dataset's report, and with several the mixture's counts, on stderr (prefixpo.data.mixture)."""
    from prefixpo.data.mixture import load_mixture

    mixture = load_mixture(cfg.data_sources(evaluation), tokenizer, on_report=lambda s: print(s, file=sys.stderr))
    if len(mixture.counts) > 1:
        print(mixture.line(), file=sys.stderr)
    groups = mixture.groups  # never empty: a dataset without usable rows is a DataError (load_groups)
    if cfg.stage == "sft":  # SFT trains the first (chosen) response of each group
        groups = [Group(g.prompt_ids, [g.response_ids[0]]) for g in groups]
    return groups


def random_weights(name_or_path: str) -> bool:
    """Whether ``name_or_path`` asks for random weights: it is a model config file (``.json``).
    A directory always needs weights (``sources.check_model`` says so before anything loads)."""
    return name_or_path.endswith(".json") and Path(name_or_path).is_file()


def load_model(name_or_path: str, cfg: TrainConfig, seed: int, dtype: torch.dtype | None = None):
    """A transformers causal LM; a config file (``.json``) gives random weights from ``seed``.
    Weights load from safetensors, or from ``.bin`` files where a local directory has only those
    (transformers reads them with ``torch.load(weights_only=True)``: no code runs).

    ``dtype``: of the loaded weights; default bf16 with ``bf16`` on CUDA, else fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype is None:
        dtype = torch.bfloat16 if cfg.bf16 and torch.cuda.is_available() else torch.float32
    if random_weights(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.trust_remote_code)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    extra = {}
    if cfg.load_in_4bit:  # QLoRA: NF4 base weights, bf16 compute; adapters train on top (apply_lora)
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    path = Path(name_or_path)
    only_bin = path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin"))
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=not only_bin,
                                                attn_implementation="sdpa",
                                                trust_remote_code=cfg.trust_remote_code, **extra)


def router_loss_note(config: Any) -> str | None:
    """A line for a Mixture-of-Experts model: TRL 1.16 adds its router load-balancing loss
    (``router_aux_loss_coef`` x aux loss, the config's own coefficient by default); prefixpo adds none.

    >>> from types import SimpleNamespace as C
    >>> router_loss_note(C(output_router_logits=False, router_aux_loss_coef=0.001))[:60]
    'note: a Mixture-of-Experts model: prefixpo adds no router lo'
    >>> router_loss_note(C()) is None, router_loss_note(C(output_router_logits=False, router_aux_loss_coef=0.0))
    (True, None)
    """
    config = getattr(config, "text_config", None) or config
    coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if not hasattr(config, "output_router_logits") or not coef:
        return None
    return (f"note: a Mixture-of-Experts model: prefixpo adds no router load-balancing loss, where TRL 1.16's DPOTrainer "
            f"adds router_aux_loss_coef ({coef:g}, the model's) x the aux loss; losses and gradients differ from TRL's")


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 master weights: trainable parameters in fp32 (bf16 compute comes from autocast, or
    from FSDP2's mixed precision policy, which does the same upcast itself). Loaded in bf16 first,
    so random weights are those of the bf16 reference."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def apply_lora(model, cfg: TrainConfig, resume_from: Path | None = None):
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("config key `use_peft`: needs the `peft` package (pip install peft)") from None
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# --- batches ------------------------------------------------------------------------------------

def make_batch(groups: list[Group], rows: list[list[int]], cfg: TrainConfig, device: torch.device,
               move: bool = True) -> Batch:
    """The batch of ``rows`` (group indices per row), laid out for ``device``; on it when ``move``."""
    layouts = [[layout_group(groups[i], cfg.prefix_sharing) for i in row] for row in rows]
    used = max((sum(len(lay) for lay in row) for row in layouts), default=0)
    if cfg.packing:
        length = row_length(max(used, 1), bucket_lengths(cfg.packing_capacity, cfg.packing_num_buckets))
    else:
        length = round_up(max(used, 1), 128 if device.type == "cuda" else 8)
    batch = build_batch(layouts, row_length=length, group_ids=rows)
    return batch.to(device) if move else batch


def group_lengths(groups: list[Group], cfg: TrainConfig) -> list[int]:
    return [g.num_tokens if cfg.prefix_sharing else g.num_separate_tokens for g in groups]


def epoch_plan(groups, cfg: TrainConfig, epoch: int, world: int, rank: int, train: bool = True):
    packing = PackingConfig(capacity=cfg.packing_capacity, num_buckets=cfg.packing_num_buckets) if cfg.packing else None
    per_micro = cfg.per_device_train_batch_size if train else cfg.per_device_eval_batch_size
    return plan_epoch(group_lengths(groups, cfg), seed=cfg.seed, epoch=epoch if train else 0, packing=packing,
                      rows_per_micro_batch=per_micro,
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps if train else 1,
                      world_size=world, rank=rank)


# --- logging --------------------------------------------------------------------------------------

@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    count: float = 0.0
    rank_tokens: list[float] = field(default_factory=list)  # real tokens of each rank
    imbalance: dict[str, float] = field(default_factory=dict)  # sums of rank_balance's shares
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, count: float, rank_tokens: list[float], rank_seconds: list[float],
            metrics: dict[str, float]) -> None:
        from prefixpo.distributed import rank_balance

        self.steps += 1
        self.loss += loss
        self.count += count
        self.rank_tokens = [a + b for a, b in zip(self.rank_tokens or [0.0] * len(rank_tokens), rank_tokens)]
        for k, v in rank_balance(rank_tokens, rank_seconds).items():
            self.imbalance[k] = self.imbalance.get(k, 0.0) + v
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def balance(self) -> dict[str, Any]:
        """Per-rank real tokens, and the per-step imbalance shares averaged over the window."""
        return {"rank_tokens": [int(t) for t in self.rank_tokens],
                **{k: v / max(self.steps, 1) for k, v in self.imbalance.items()}}


@dataclass
class Divergence:
    """Signs that training diverged, from where the loss and the gradient norm have been: the loss's
    level is the larger of the first step's loss and a running mean (so a loss that falls towards 0
    does not make ordinary noise look like an explosion).

    >>> guard = Divergence()
    >>> guard.check_loss(0.69, 10.0) is None and guard.update(0.69, 0.43) is None
    True
    >>> guard.check_loss(float("nan"), 10.0), guard.check_loss(9.0, 10.0), guard.check_loss(9.0, 0.0)
    ('the loss is nan', 'the loss jumped to 9, 13x its level so far (0.69; loss_spike_factor 10)', None)
    >>> guard.check_gradient(float("inf"), 0.6), guard.check_gradient(0.0, 0.01), guard.check_gradient(0.0, 0.68)[:35]
    ('the gradient norm is inf', None, 'the gradient vanished (norm 0 at th')
    """

    first_loss: float | None = None
    mean_loss: float | None = None
    first_grad: float | None = None

    def update(self, loss: float, grad_norm: float) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss
        self.first_grad = grad_norm if self.first_grad is None else self.first_grad

    def check_loss(self, loss: float, factor: float) -> str | None:
        """Why training must stop at this loss, or None: it is not finite, or (``factor`` > 0) it is
        more than ``factor`` times the level so far."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if factor and self.first_loss is not None:
            level = max(self.first_loss, self.mean_loss or 0.0)
            if level > 0 and loss > factor * level:
                return (f"the loss jumped to {loss:.4g}, {loss / level:.0f}x its level so far ({level:.4g}; "
                        f"loss_spike_factor {factor:g})")
        return None

    def check_gradient(self, grad_norm: float, loss: float) -> str | None:
        """Why training must stop at this gradient norm, or None: it is not finite, or it vanished
        (below 1e-9 of the first step's) while the loss stayed above half its first value: the
        model's outputs saturated (a far too high learning rate does this), so nothing can train."""
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        if self.first_grad and self.first_loss and grad_norm <= 1e-9 * self.first_grad \
                and loss > 0.5 * self.first_loss:
            return (f"the gradient vanished (norm {grad_norm:.3g} at this step, {self.first_grad:.3g} at the first) "
                    f"while the loss stayed at {loss:.4g}: the model's outputs saturated")
        return None


def memory(device: torch.device) -> dict[str, float]:
    """This rank's peak GPU memory so far, in GiB (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def write_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the lines written after the checkpoint's step."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


@contextmanager
def written_whole(path: Path, last_good: Path | None):
    """Writing ``path`` (a checkpoint's temporary directory, or ``final/``): on an OS error (a full
    disk, a quota) the partial directory is removed and the run stops with one line naming the path,
    the free space and the last good checkpoint."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)
        place = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(place).free / 2**30
        raise TrainingError(f"could not write {path} ({err.strerror or err}; {free:.1f} GiB free there); removed the "
                            f"partial {path.name}. The last good checkpoint is {last_good or 'none'}; free some space "
                            "and resume with --resume_from_checkpoint latest") from None


def plot_quietly(run_dir: Path) -> None:
    """``curves.png`` of a run; plotting is a convenience, so a missing matplotlib is a note, not a failure."""
    try:
        from prefixpo.plot import plot_run

        plot_run(run_dir)
    except Exception as err:
        print(f"note: no plots ({err})", file=sys.stderr)


# --- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(policy, groups, cfg: TrainConfig, loss_fn, reference, accelerator) -> dict[str, float]:
    from prefixpo.distributed import is_collective
    from prefixpo.modeling import build_attention_masks, compute_logps
    from prefixpo.pairs import PairConfig
    from prefixpo.step import batch_pair_indices, pair_losses

    was_training = policy.training
    policy.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for step in epoch_plan(groups, cfg, 0, accelerator.num_processes, accelerator.process_index, train=False):
        for rows in step:
            batch = make_batch(groups, rows, cfg, accelerator.device)
            masks = build_attention_masks(policy, batch)
            logps = compute_logps(policy, batch, masks, cfg.logps_chunk_size, log_sum_sq=cfg.use_weighting)
            if cfg.stage == "sft":
                sums["loss"] = sums.get("loss", 0.0) - logps.token_logps.double().sum()
                count += batch.scored_targets.numel()
                continue
            pairs = batch_pair_indices(batch, PairConfig(cfg.pair_strategy, cfg.pair_min_gap))
            # a sharded reference runs on every rank's every batch, even one without pairs
            run_ref = reference is not None and (pairs.num_pairs > 0 or is_collective(reference))
            ref = reference(batch, masks) if run_ref else None
            if pairs.num_pairs == 0:
                continue
            losses, metrics = pair_losses(logps, ref, pairs, loss_fn)
            for k, v in {"loss": losses, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.double().sum()
            count += pairs.num_pairs
    policy.train(was_training)
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=accelerator.device) for k in keys]
                         + [count])
    totals = accelerator.reduce(totals, reduction="sum")
    n = totals[-1].item()
    return {k: totals[i].item() / n for i, k in enumerate(keys)} if n else {}


# --- the stage ----------------------------------------------------------------------------------

def build_reference(cfg: TrainConfig, policy, train_groups, eval_groups, accelerator, sharding: str = "none"):
    """(train reference, eval reference, mode): a function per data split, or None for reference-free losses.

    ``policy``: the prepared policy. ``sharding`` (``none``, ``fsdp`` or ``deepspeed``): a frozen
    reference model is sharded like the policy (FSDP2, or a frozen ZeRO-3 engine; ZeRO-1/2 keep a
    whole copy per rank), and a reference that runs a sharded forward is marked collective."""
    from prefixpo.distributed import collective, every_rank_loads_weights, shard_frozen
    from prefixpo.losses import loss_requires_reference
    from prefixpo.reference import (
        groups_fingerprint,
        model_fingerprint,
        precompute_reference,
        reference_from_adapters_off,
        reference_from_cache,
    )
    from prefixpo.samples import adapters_off, attach
    from prefixpo.step import reference_from_model
    from prefixpo.zero import apply_attention, frozen_engine, is_partitioned, whole_model_loading, zero_stage

    if cfg.stage == "sft" or not loss_requires_reference(cfg.loss_type, cfg.reference_free):
        if cfg.reference_mode not in ("auto", "none"):
            print(f"note: loss {cfg.loss_type} needs no reference; reference_mode ignored", file=sys.stderr)
        return None, None, "none"
    mode = cfg.reference_mode
    if mode == "none":
        raise ConfigError(f"config key `reference_mode`: loss {cfg.loss_type} needs a reference model")
    if mode == "auto":
        mode = "adapters_off" if cfg.use_peft and not cfg.ref_model_name_or_path else "model"
    sharded = sharding != "none"
    if mode == "adapters_off":
        fn = reference_from_adapters_off(policy, cfg.logps_chunk_size, through_wrapper=sharded)
        fn = attach(collective(fn) if sharded else fn, policy, adapters_off(policy))  # attach: for samples
        return fn, fn, mode
    source = cfg.ref_model_name_or_path or cfg.model_name_or_path
    # ZeRO-3 (zero3_init_flag) loads the model partitioned, for a frozen engine; a precomputed
    # reference runs without one, so it is loaded whole, as random weights are (see train_stage)
    with every_rank_loads_weights(), whole_model_loading(mode == "precomputed" or random_weights(source)):
        reference = load_model(source, cfg, cfg.seed).eval().requires_grad_(False)
    if not is_partitioned(reference):
        reference.to(accelerator.device)
    apply_attention(reference, cfg.attention_backend)
    if mode == "model":
        if sharding == "fsdp":  # 1/world of the frozen model per rank, instead of a full copy
            reference = shard_frozen(reference, accelerator.device)
            fn = collective(reference_from_model(reference, cfg.logps_chunk_size))
        elif zero_stage(accelerator) == 3:  # the same with ZeRO-3
            reference = frozen_engine(reference, accelerator)
            fn = collective(reference_from_model(reference, cfg.logps_chunk_size))
        else:
            fn = reference_from_model(reference, cfg.logps_chunk_size)
        fn = attach(fn, reference)  # the model itself: generate_during_eval samples it, TR-DPO updates it
        return fn, fn, mode
    from prefixpo.data.config import default_cache_dir

    cache = Path(default_cache_dir()).parent / "reference"
    key = model_fingerprint(source, cfg.seed, "bf16" if cfg.bf16 else "fp32")
    fns = []
    for groups in (train_groups, eval_groups):
        if not groups:
            fns.append(None)
            continue
        path = cache / f"{key}-{groups_fingerprint(groups)}-{int(cfg.prefix_sharing)}.pt"
        with accelerator.local_main_process_first():  # one process per node computes and writes the cache
            per_group = precompute_reference(reference, groups, path, cfg.per_device_eval_batch_size,
                                             cfg.logps_chunk_size, cfg.prefix_sharing)
        fns.append(reference_from_cache(per_group))
    del reference  # precomputed: no reference model in memory during training
    return fns[0], fns[1], mode


START_AGREEMENT = 0.05  # bf16 rounding moves summed log-probs by ~1e-4 of their size; a broken path by far more


def reference_disagreement(metric_sums: dict[str, float], beta: float) -> float | None:
    """How far apart policy and reference log-probs are, relative to their size, from a step's
    metric sums: ``sum |rewards| / beta / sum |logps|`` over chosen and rejected (rewards are
    ``beta (policy - reference)``). None when the loss reports no such metrics.

    >>> reference_disagreement({"rewards/chosen": 0.5, "rewards/rejected": -0.5,
    ...                         "logps/chosen": -60.0, "logps/rejected": -40.0}, beta=0.1)
    0.1
    """
    keys = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    if not all(k in metric_sums for k in keys) or beta <= 0:
        return None
    size = abs(metric_sums["logps/chosen"]) + abs(metric_sums["logps/rejected"])
    gap = (abs(metric_sums["rewards/chosen"]) + abs(metric_sums["rewards/rejected"])) / beta
    return gap / size if size > 0 else None


def check_start_agreement(metrics: dict[str, float], beta: float, accelerator) -> None:
    """Stop a run whose policy and reference, loaded from the same weights, already disagree at step 1:
    the attention, sharding or precision path differs between the two, and training would optimise
    that difference instead of the preference loss."""
    keys = sorted(metrics)
    sums = accelerator.reduce(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                           device=accelerator.device), "sum").tolist()
    gap = reference_disagreement(dict(zip(keys, sums)), beta)
    if gap is not None and gap > START_AGREEMENT:
        raise TrainingError(
            f"at step 1 the policy and the reference model, loaded from the same weights, disagree by "
            f"{100 * gap:.1f}% of their summed log-probs (rounding gives ~0.01%): the two models do not run the "
            "same computation. Check that both use the same attention_backend and dtype; run `prefixpo verify` "
            "for the model; under FSDP or DeepSpeed, compare with a single-process run.")


def train_stage(cfg: TrainConfig) -> dict[str, Any]:
    """Train one stage; returns what ``OUTPUT_DIR/training_done.json`` records (``steps``, the
    length settings, ``reference``, the last ``eval`` metrics). The final model goes to OUTPUT_DIR/final."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.utils import logging as transformers_logging

    from prefixpo.checkpoint import (
        DEEPSPEED_DIR,
        SHARDED_DIR,
        CheckpointError,
        checkpoint_dirs,
        checkpoint_sharding,
        finish_checkpoint,
        list_checkpoints,
        load_engine_state,
        load_sharded_state,
        load_state,
        resolve_checkpoint,
        rng_state,
        save_checkpoint,
        save_engine_state,
        save_model,
        save_sharded_state,
        start_checkpoint,
        verify_checkpoint,
    )
    from prefixpo.checkpoint import set_rng_state as restore_rng
    from prefixpo.distributed import (
        apply_fsdp_hints,
        keep_fp32_outputs,
        reference_for_step,
        synchronize,
        tied_aliases,
        tied_embeddings,
    )
    from prefixpo.losses import get_loss
    from prefixpo.modeling import ScoredLM, build_attention_masks
    from prefixpo.pairs import PairConfig
    from prefixpo.reference import reference_sync
    from prefixpo.samples import eval_samples
    from prefixpo.step import activation_offload, batch_pair_indices, preference_step, sft_step
    from prefixpo.zero import (
        accumulation_boundary,
        apply_attention,
        configure,
        engine_backward,
        is_deepspeed,
        is_partitioned,
        optimizer_step,
        register_head,
        whole_model_loading,
        zero_stage,
    )

    out = Path(cfg.output_dir)
    # trackers name the run after output_dir; tensorboard writes its events into output_dir itself
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", log_with=cfg.reports or None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out.parent)))
    main = accelerator.is_main_process
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    deepspeed = is_deepspeed(accelerator)
    sharding = "fsdp" if fsdp else "deepspeed" if deepspeed else "none"  # how the optimizer state is saved
    if deepspeed:
        if cfg.load_in_4bit:
            raise ConfigError("config key `load_in_4bit`: QLoRA is not supported under DeepSpeed; run it on one "
                              "GPU or with DDP (examples/accelerate/ddp.yaml)")
        configure(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)  # before the model loads
        # accelerate's own count, which it compares with the DeepSpeed config's (and warns)
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    if fsdp and not accelerator.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(examples/accelerate/fsdp2.yaml)")
    if fsdp:
        keep_fp32_outputs(accelerator.state.fsdp_plugin)
    if cfg.torch_num_threads:
        torch.set_num_threads(cfg.torch_num_threads)
    transformers_logging.disable_progress_bar()  # no loading and saving bars between the trainer's own lines
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(cfg, out / "config.yaml")
    checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint else None
    if checkpoint is not None:  # every file whole, as saved (the main process reads, every rank learns)
        problem = broadcast_object_list([verify_checkpoint(checkpoint) if main else None])[0]
        if problem:
            others = [p.name for p in list_checkpoints(out) if p != checkpoint]
            raise CheckpointError(problem + (f"; resume from another checkpoint ({', '.join(others)} in {out})"
                                             if others else "; no other checkpoint to resume from"))

    tokenizer = load_tokenizer(cfg)
    train_groups = load_data(cfg, tokenizer)
    eval_groups = load_data(cfg, tokenizer, evaluation=True) if cfg.eval_dataset else []
    if cfg.packing:
        lengths = group_lengths(train_groups, cfg)
        if max(lengths) > cfg.packing_capacity:
            raise ConfigError(f"config key `packing_capacity`: a group of {max(lengths)} tokens does not fit "
                              f"in {cfg.packing_capacity}; raise it or lower max_length")

    # DeepSpeed keeps fp32 master weights in its optimizer itself (bf16 in its config)
    master = cfg.bf16 and (cfg.fp32_master_weights or fsdp) and not cfg.load_in_4bit and not deepspeed
    resume_weights = checkpoint is not None and not cfg.use_peft
    source = str(checkpoint) if resume_weights else cfg.model_name_or_path
    # random weights are drawn whole, not by ZeRO-3's partitioned init (zero3_init_flag), so that a
    # seed gives the same model under every engine
    with whole_model_loading(random_weights(source)):
        # a checkpoint holds the fp32 master weights: load them as they are, not rounded to bf16
        model = load_model(source, cfg, cfg.seed, dtype=torch.float32 if resume_weights and master else None)
    if cfg.use_peft:
        model = apply_lora(model, cfg, checkpoint)
    if cfg.disable_dropout:  # TRL's default, after the adapters as TRL does: every nn.Dropout gets p = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if master:
        upcast_trainable(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # a quantized model is placed on the GPU when it loads, a ZeRO-3-partitioned one by its engine
    if not cfg.load_in_4bit and not is_partitioned(model):
        model.to(accelerator.device)
    apply_attention(model, cfg.attention_backend)
    if main and cfg.stage == "preference" and (note := router_loss_note(model.config)):
        print(note, file=sys.stderr)
    loss_fn = get_loss(cfg.loss_type, **cfg.loss_kwargs()) if cfg.stage == "preference" else None
    pair_config = PairConfig(cfg.pair_strategy, cfg.pair_min_gap)

    policy = ScoredLM(model)
    tied, aliases = tied_embeddings(model), tied_aliases(model)
    if fsdp:
        apply_fsdp_hints(policy)
    if cfg.torch_compile:
        policy = torch.compile(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay, fused=accelerator.device.type == "cuda")
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(epoch_plan(train_groups, cfg, 0, world, rank))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    params = [p for p in policy.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    if zero_stage(accelerator) == 3:  # the scored forward reads the output layer's (partitioned) weight
        register_head(accelerator.unwrap_model(policy))
    if tied and not tied_embeddings(accelerator.unwrap_model(policy)):
        raise TrainingError("the model's tied input and output embeddings became two parameters when the model "
                            "was prepared; set fsdp_cpu_ram_efficient_loading: false in the accelerate config")
    # a fresh run whose policy and reference start from the same weights: their log-probs must agree at step 1
    checks_start_agreement = (cfg.stage == "preference" and checkpoint is None
                              and cfg.ref_model_name_or_path in (None, cfg.model_name_or_path))
    train_ref, eval_ref, ref_mode = build_reference(cfg, policy, train_groups, eval_groups, accelerator,
                                                    sharding=sharding)
    checks_start_agreement = checks_start_agreement and ref_mode != "none"
    sync = reference_sync(accelerator.unwrap_model(policy).model, train_ref, cfg.ref_model_mixup_alpha,
                          cfg.ref_model_sync_steps, zero_stage(accelerator) == 3) \
        if cfg.sync_ref_model and ref_mode != "none" else None

    step = 0
    metrics_path = out / "metrics.jsonl"
    if checkpoint is not None:
        state = load_state(checkpoint)
        saved = checkpoint_sharding(state)
        if saved != sharding:
            names = {"none": "without FSDP or DeepSpeed", "fsdp": "with FSDP", "deepspeed": "with DeepSpeed"}
            raise TrainingError(f"{checkpoint} was saved {names[saved]}; resume it {names[saved]} too (this run "
                                f"is {names[sharding]})")
        if fsdp:  # this rank's optimizer shard and RNG state
            load_sharded_state(policy, optimizer.optimizer, checkpoint / SHARDED_DIR)
        elif deepspeed:  # the engine's partitions of the weights and optimizer state, this rank's RNG state
            load_engine_state(policy, checkpoint / DEEPSPEED_DIR)
        else:
            optimizer.load_state_dict(state["optimizer"])
            restore_rng(state["rng"])
        if sync is not None:  # TR-DPO: the reference as it was at that step
            sync.load(checkpoint)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if main:
            truncate_metrics(metrics_path, step)
            (out / DONE_MARKER).unlink(missing_ok=True)  # continuing a finished run: not finished until it ends
        print(f"resumed from {checkpoint} at step {step}", file=sys.stderr)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    if cfg.reports:
        accelerator.init_trackers(out.name, config={k: str(v) for k, v in vars(cfg).items()})
    if main and cfg.packing:
        stats = packing_stats(train_groups, [r for s in epoch_plan(train_groups, cfg, 0, 1, 0) for m in s for r in m],
                              PackingConfig(capacity=cfg.packing_capacity))
        print(f"packing: {stats.as_dict()}", file=sys.stderr)

    def full_weights() -> dict[str, torch.Tensor]:
        """The transformers model's full state dict, without tied aliases; every rank calls it
        (FSDP and ZeRO-3 gather the shards, to the main process)."""
        state = accelerator.get_state_dict(policy) or {}  # DeepSpeed: None on the other ranks
        weights = {k.removeprefix("model."): v for k, v in state.items()}
        return {k: v for k, v in weights.items() if k not in aliases}

    def save(at_step: int) -> Path:
        """Every rank calls it. The main process writes the whole model; under FSDP (DeepSpeed) every
        rank also writes its optimizer shard (engine checkpoint) into the same temporary directory
        before the rename."""
        started = time.perf_counter()
        state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": at_step,
                 "epoch": at_step // max(steps_per_epoch, 1), "sharding": sharding}
        if sharding == "none":
            state["optimizer"] = optimizer.state_dict()
        accelerator.wait_for_everyone()
        weights = full_weights()
        ref_weights = sync.full_weights() if sync is not None else None  # TR-DPO's reference (every rank)
        save_reference = (lambda d: sync.save(d, ref_weights)) if sync is not None else None
        inner = accelerator.unwrap_model(policy).model
        path = None
        if sharding == "none":
            if main:
                with written_whole(checkpoint_dirs(out, at_step)[1], last_saved):
                    path = save_checkpoint(out, at_step, inner, tokenizer, state, cfg.save_total_limit,
                                           state_dict=weights, extra=save_reference)
        else:
            tmp = checkpoint_dirs(out, at_step)[1]
            if main:
                with written_whole(tmp, last_saved):
                    save_model(inner, tokenizer, start_checkpoint(out, at_step), state_dict=weights)
                    if save_reference is not None:
                        save_reference(tmp)
            accelerator.wait_for_everyone()  # the temporary directory exists
            with written_whole(tmp, last_saved):  # a full shared disk stops every rank
                if fsdp:
                    save_sharded_state(policy, optimizer.optimizer, tmp / SHARDED_DIR)
                else:
                    save_engine_state(policy, tmp / DEEPSPEED_DIR)
            accelerator.wait_for_everyone()  # every rank wrote its part
            if main:
                with written_whole(tmp, last_saved):
                    path = finish_checkpoint(out, at_step, state, cfg.save_total_limit)
        accelerator.wait_for_everyone()
        took = time.perf_counter() - started
        window.started += took  # throughput counts training time only
        if main:
            print(f"saved {path} in {took:.1f}s", file=sys.stderr)
        return path or out / f"checkpoint-{at_step}"

    def log(record: dict[str, Any]) -> None:
        if main:
            write_metrics(metrics_path, record)
            if cfg.reports:
                accelerator.log({f"{record['split']}/{k}": v for k, v in record.items()
                                 if isinstance(v, float)}, step=record["step"])

    last_eval: dict[str, float] = {}

    def run_eval(at_step: int) -> dict[str, float]:
        started = time.perf_counter()
        result = evaluate(policy, eval_groups, cfg, loss_fn, eval_ref, accelerator)
        last_eval.clear()
        last_eval.update(result, step=at_step)
        log({"step": at_step, "stage": cfg.stage, "split": "eval", **result})
        if cfg.generate_during_eval:  # every rank: a sharded model generates on all of them
            eval_samples(policy, eval_ref, tokenizer, [g.prompt_ids for g in eval_groups[: cfg.num_generations]],
                         at_step, cfg, accelerator, out)
        window.started += time.perf_counter() - started  # throughput counts training time only
        return result

    def no_sync(last: bool):
        return nullcontext() if last or world == 1 else accelerator.no_sync(policy)

    backward = torch.Tensor.backward
    if deepspeed:  # the engine runs backward (not dividing by accumulation: the step scales the loss)
        backward, no_sync = engine_backward(policy), accumulation_boundary(policy)  # and marks the step's end
    lengths = group_lengths(train_groups, cfg)
    bar = tqdm(total=total_steps, initial=step, disable=not main or cfg.disable_progress_bar,
               desc=f"{cfg.stage}", unit="step", dynamic_ncols=True)
    window, plans, guard = Window(), {}, Divergence()
    last_saved = checkpoint
    policy.train()
    signals = StopSignals().__enter__()  # from here a signal stops the run at the end of a step, with a checkpoint
    try:
        if eval_groups and step == 0:
            run_eval(0)
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: epoch_plan(train_groups, cfg, epoch, world, rank)}
            synchronize(accelerator.device)
            started = time.perf_counter()
            rows = plans[epoch][index]
            on_host = [make_batch(train_groups, r, cfg, accelerator.device, move=False) for r in rows]
            micro_batches = [mb.to(accelerator.device) for mb in on_host]
            with activation_offload(cfg.activation_offloading, accelerator.device):
                if cfg.stage == "sft":
                    result = sft_step(policy, micro_batches, cfg.logps_chunk_size, no_sync=no_sync, backward=backward)
                else:
                    # pairs from the host copies: finding them on the device would wait for the GPU
                    pairs = [batch_pair_indices(mb, pair_config) for mb in on_host]
                    reference, masks = reference_for_step(train_ref, micro_batches,
                                                          lambda mb: build_attention_masks(policy, mb))
                    result = preference_step(policy, micro_batches, loss_fn, reference, pair_config,
                                             cfg.logps_chunk_size, no_sync=no_sync, pairs=pairs, backward=backward,
                                             masks=masks)
            synchronize(accelerator.device)
            compute_s = time.perf_counter() - started  # this rank's work, before the optimizer step
            tokens = sum(lengths[i] for mb in rows for row in mb for i in row)
            # one gather: every rank's loss share, real tokens, compute time and a stop signal received
            ranks = accelerator.gather(torch.tensor([[result.loss, tokens, compute_s, signals.received or 0]],
                                                    dtype=torch.float64, device=accelerator.device)).cpu()
            loss = ranks[:, 0].sum().item()
            stop = guard.check_loss(loss, cfg.loss_spike_factor)
            if not stop:
                if step == 0 and checks_start_agreement:
                    check_start_agreement(result.metrics, cfg.beta, accelerator)
                if deepspeed:  # the engine clips (gradient_clipping = max_grad_norm) and steps: its norm comes after
                    grad_norm = float(optimizer_step(policy))
                    stop = guard.check_gradient(grad_norm, loss)
                else:  # max_grad_norm 0: no clipping; the norm is still measured, checked and logged
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
                    stop = guard.check_gradient(grad_norm, loss)  # a finite loss can have non-finite gradients
                    if not stop:
                        optimizer.step()
            if stop:
                raise TrainingError(f"{stop} at step {step + 1}; stopping before the optimizer step, without saving. "
                                    f"The last good checkpoint is {last_saved or 'none (no checkpoint was saved yet)'}. "
                                    "Lower learning_rate, or check the data and bf16 settings.")
            guard.update(loss, grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if sync is not None:  # TR-DPO: every ref_model_sync_steps steps, the policy mixed into the reference
                sync(step)
            window.add(loss, result.count, ranks[:, 1].tolist(), ranks[:, 2].tolist(), result.metrics)
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                keys = sorted(window.metrics)
                sums = accelerator.reduce(torch.tensor([window.metrics[k] for k in keys], dtype=torch.float64,
                                                       device=accelerator.device), "sum")
                seconds = time.perf_counter() - window.started
                unit = "tokens" if cfg.stage == "sft" else "pairs"
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "stage": cfg.stage,
                          "split": "train", "loss": window.loss / window.steps,
                          "learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "target_tokens" if cfg.stage == "sft" else "pairs": window.count,
                          f"{unit}_per_s": window.count / seconds, "tokens_per_s": sum(window.rank_tokens) / seconds,
                          "step_time_s": seconds / window.steps, **window.balance(), **memory(accelerator.device),
                          **{k: sums[i].item() / window.count for i, k in enumerate(keys)}}
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", **{f"{unit}/s": f"{record[f'{unit}_per_s']:.1f}"})
                window = Window()
            if eval_groups and cfg.eval_steps and step % cfg.eval_steps == 0:
                run_eval(step)
            if cfg.save_steps and step % cfg.save_steps == 0:
                last_saved = save(step)
            received = int(ranks[:, 3].max().item())  # any rank's signal stops every rank at this step
            if received:
                path = last_saved if last_saved and last_saved.name == f"checkpoint-{step}" else save(step)
                bar.close()
                raise TrainingError(f"stopped by {signal.Signals(received).name}: saved {path} at step {step}; resume "
                                    "with --resume_from_checkpoint latest", exit_code=128 + received)
    except KeyboardInterrupt:  # a second signal: now, without a checkpoint
        bar.close()
        raise TrainingError(f"stopped at once by a second {signals.name or 'interrupt'}, without saving; the last "
                            f"checkpoint is {last_saved or 'none'}", exit_code=signals.exit_code) from None
    finally:
        signals.__exit__()
    bar.close()
    if cfg.save_steps and (last_saved is None or last_saved.name != f"checkpoint-{step}"):
        save(step)  # the end's checkpoint too: a finished run can be continued to a larger max_steps
    if eval_groups and last_eval.get("step") != step:
        run_eval(step)
    final_metrics = dict(last_eval)
    accelerator.wait_for_everyone()
    weights = full_weights()
    record = {**finished_record(cfg, step), "reference": ref_mode, "eval": final_metrics}
    if main:
        with written_whole(out / "final", last_saved):
            save_model(accelerator.unwrap_model(policy).model, tokenizer, out / "final", state_dict=weights)
        (out / DONE_MARKER).write_text(json.dumps(record))
        plot_quietly(out)
    accelerator.wait_for_everyone()
    if cfg.reports:
        accelerator.end_training()
    return record


# --- command line -------------------------------------------------------------------------------

ACCEPTS_OVERRIDES = True  # every other --key value is a config override


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixpo.cli import name_mapping

    parser.add_argument("--config", help="YAML config (see docs/training.md)")
    parser.add_argument("--column-map", type=name_mapping, action="append", default=[], metavar="NAME=COLUMN",
                        help="map a canonical column to a dataset column (repeatable), e.g. chosen=good: the column "
                             "map of every dataset that has none of its own (data: {column_map: ...})")
    parser.epilog = ("Any other --key value overrides a config key in every stage; --STAGE.key value (e.g. "
                     "--sft.learning_rate 1e-5) overrides it in one stage. --resume_from_checkpoint latest "
                     "resumes from the newest checkpoint.")


def run(args: argparse.Namespace) -> int:
    try:
        stages = load_stages(args.config, args.overrides)
        if args.column_map:  # over every stage's default column map
            for cfg in stages:
                cfg.data = {**cfg.data, "column_map": {**cfg.data.get("column_map", {}), **dict(args.column_map)}}
        plans = plan_stages(stages)  # never overwrite a run, nothing to resume: before anything loads
        for cfg, plan in zip(stages, plans):
            cfg.resume_from_checkpoint = plan.checkpoint
        from prefixpo.sources import check_stages  # every model, tokenizer, dataset, checkpoint: fail fast

        check_stages([cfg for cfg, plan in zip(stages, plans) if plan.action != "skip"])
    except ConfigError as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return 2
    from prefixpo.checkpoint import CheckpointError
    from prefixpo.data.errors import DataError  # after the checks: it imports datasets (a second or more)

    try:
        for cfg, plan in zip(stages, plans):
            if plan.note:
                print(plan.note, file=sys.stderr)
            if plan.action == "skip":
                continue
            # the main process (of a launched run: RANK 0) holds the directory while the stage trains
            with RunLock(cfg.output_dir, main=os.environ.get("RANK", "0") == "0") as lock:
                if plan.clear and lock.main:  # the old run's files, removed once
                    clear_run(cfg.output_dir)
                done = train_stage(cfg)
            print(f"stage {cfg.stage} done: {describe_done(done, Path(cfg.output_dir))}")
        if len(stages) > 1:
            plot_quietly(Path(stages[0].output_dir).parent)  # every stage in one figure
        end_process_group()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return err.exit_code
    except torch.cuda.OutOfMemoryError as err:
        print(f"prefixpo train: CUDA out of memory ({str(err).splitlines()[0]}). Lower packing_capacity or "
              "per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), turn on "
              "gradient_checkpointing, or lower logps_chunk_size.", file=sys.stderr)
        return 1
    return 0


def end_process_group() -> None:
    """A launched run's ranks leave together: every rank waits for the others, then closes the
    process group itself (left to interpreter teardown, gloo's threads at times abort a rank that
    has finished its work: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def describe_done(record: dict[str, Any], out: Path) -> str:
    """``40 steps, model in runs/x/final; eval loss 0.3123, rewards/accuracies 0.9750``."""
    text = f"{record['steps']} steps, model in {out / 'final'}"
    evals = {k: record["eval"][k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in record["eval"]}
    if evals:
        text += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items())
    return text
