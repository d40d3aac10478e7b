"""The reference model's log-probs: a frozen model, the policy with LoRA adapters disabled, or
log-probs precomputed once and cached on disk (then no reference model stays in memory)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prefixpo.layout import Batch, Group, build_batch, layout_group
from prefixpo.logprobs import DEFAULT_CHUNK_SIZE, ResponseLogps, compute_logps
from prefixpo.step import ReferenceFn


def reference_from_adapters_off(policy: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                through_wrapper: bool = False) -> ReferenceFn:
    """The PEFT policy with its adapters disabled: the base model, with no second copy in memory.

    ``through_wrapper``: run the forward through ``policy`` itself (an FSDP-sharded ``ScoredLM``,
    whose hooks gather the shards) rather than the PEFT model found inside it."""
    peft_model = policy
    while not hasattr(peft_model, "disable_adapter"):
        peft_model = getattr(peft_model, "module", None) or getattr(peft_model, "model", None)
        if peft_model is None:
            raise ValueError("reference from disabled adapters needs a PEFT model")

    @torch.no_grad()
    def fn(batch: Batch, masks: object) -> ResponseLogps:
        with peft_model.disable_adapter():
            return compute_logps(policy if through_wrapper else peft_model, batch, masks, chunk_size)

    return fn


def groups_fingerprint(groups: Sequence[Group]) -> str:
    """A hash of every group's token ids (what the reference log-probs depend on)."""
    h = hashlib.sha256()
    for g in groups:
        h.update(json.dumps([list(g.prompt_ids), [list(r) for r in g.response_ids]]).encode())
    return h.hexdigest()[:20]


def model_fingerprint(name_or_path: str, seed: int, dtype: str) -> str:
    """The model's identity: its weight files' names, sizes and times for a local directory, a
    config file's content and the seed for random weights, else the hub name."""
    path = Path(name_or_path)
    parts = [name_or_path, dtype]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    elif path.is_file():  # a config file: random weights from the seed
        parts += [hashlib.sha256(path.read_bytes()).hexdigest(), f"seed={seed}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def precompute_reference(reference: nn.Module, groups: Sequence[Group], cache_path: Path,
                         batch_size: int = 8, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         share_prefix: bool = True) -> list[torch.Tensor]:
    """Per-group reference log-prob sums ``[n_responses]`` (fp32, on CPU), computed once and cached."""
    if cache_path.is_file():
        return torch.load(cache_path, weights_only=True)
    device = next(reference.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(groups), batch_size):
        part = groups[start:start + batch_size] if isinstance(groups, list) else \
            [groups[i] for i in range(start, min(start + batch_size, len(groups)))]
        batch = build_batch([[layout_group(g, share_prefix)] for g in part], pad_to_multiple_of=128).to(device)
        sums = compute_logps(reference, batch, chunk_size=chunk_size).sums.float().cpu()
        out += list(sums.split([len(g.response_ids) for g in part]))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(cache_path)
    return out


def reference_from_cache(per_group: Sequence[torch.Tensor]) -> ReferenceFn:
    """Reference log-probs looked up by ``batch.group_ids`` from precomputed per-group sums."""

    def fn(batch: Batch, masks: object) -> ResponseLogps:
        if batch.group_ids is None:
            raise ValueError("precomputed reference log-probs need batches built with group_ids")
        device = batch.response_lengths.device
        sums = torch.cat([per_group[i] for i in batch.group_ids.tolist()]).to(device) if batch.num_groups \
            else torch.zeros(0, device=device)
        counts = batch.response_lengths
        return ResponseLogps(sums=sums, means=sums / counts, counts=counts, token_logps=sums.new_zeros(0))

    return fn
