"""The reference model's log-probs: a frozen model, the policy with LoRA adapters disabled, or
log-probs precomputed once and cached on disk (then no reference model stays in memory)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prefixpo.layout import Batch, Group
from prefixpo.logprobs import DEFAULT_CHUNK_SIZE, ResponseLogps
from prefixpo.modeling import compute_logps
from prefixpo.packing import batch_rows
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
        rows = [[i] for i in range(start, min(start + batch_size, len(groups)))]
        batch = batch_rows(groups, rows, prefix_sharing=share_prefix, pad_to_multiple_of=128).to(device)
        sums = compute_logps(reference, batch, chunk_size=chunk_size).sums.float().cpu()
        out += list(sums.split([len(groups[i].response_ids) for i, in rows]))
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


# --- TR-DPO: the reference model updated from the policy during training -----------------------

REFERENCE_DIR = "reference"  # a checkpoint's synced reference weights (TR-DPO)
REFERENCE_FILE = "model.safetensors"


def mix_into(reference: torch.Tensor, policy: torch.Tensor, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference``, in place, in the reference's dtype.

    Sharded parameters (FSDP2 DTensors) mix their local shards: both must be sharded alike."""
    if hasattr(reference, "to_local") or hasattr(policy, "to_local"):
        if not (hasattr(reference, "to_local") and hasattr(policy, "to_local")) \
                or reference.placements != policy.placements or reference.shape != policy.shape:
            raise ValueError("the reference and the policy are not sharded alike")
        reference, policy = reference.to_local(), policy.to_local()
        if reference.shape != policy.shape:
            raise ValueError("the reference's and the policy's local shards differ in shape")
    reference.mul_(1.0 - alpha).add_(policy, alpha=alpha)


class ReferenceSync:
    """TR-DPO (Gorbatovski et al. 2024; TRL's ``sync_ref_model``): every ``every`` optimizer steps,
    every reference parameter becomes ``alpha * policy + (1 - alpha) * reference``.

    ``policy`` and ``reference``: the two transformers models (unwrapped), their parameters matched by
    name; FSDP2-sharded ones mix shard by shard, with no communication."""

    def __init__(self, policy: nn.Module, reference: nn.Module, alpha: float, every: int):
        ours = dict(policy.named_parameters())
        theirs = dict(reference.named_parameters())
        if ours.keys() != theirs.keys():
            missing = sorted(ours.keys() ^ theirs.keys())[:3]
            raise ValueError(f"the reference and the policy have different parameters (e.g. {missing})")
        self.pairs = [(theirs[name], ours[name]) for name in theirs]
        self.reference, self.alpha, self.every = reference, alpha, every

    @torch.no_grad()
    def __call__(self, step: int) -> bool:
        """After optimizer step ``step`` (counted from 1): mix when it is a sync step; whether it was."""
        if step % self.every:
            return False
        for ref, pol in self.pairs:
            mix_into(ref.data, pol.data, self.alpha)
        return True

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on CPU (every rank calls it: sharded ones are gathered)."""
        out = {}
        for name, p in self.reference.named_parameters():
            t = p.data.full_tensor() if hasattr(p.data, "full_tensor") else p.data
            out[name] = t.detach().to("cpu", copy=True).contiguous()
        return out

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the reference's parameters from ``full_weights`` output (sharded ones take their shard)."""
        from torch.distributed.tensor import distribute_tensor

        for name, p in self.reference.named_parameters():
            full = weights[name]
            if hasattr(p.data, "to_local"):
                full = distribute_tensor(full.to(p.data.to_local().device), p.data.device_mesh, p.data.placements)
                p.data.to_local().copy_(full.to_local())
            else:
                p.data.copy_(full)

    def save(self, checkpoint: Path, weights: dict[str, torch.Tensor]) -> None:
        """Write ``weights`` (``full_weights``) as ``checkpoint/reference/model.safetensors`` (main process)."""
        from safetensors.torch import save_file

        (checkpoint / REFERENCE_DIR).mkdir(exist_ok=True)
        save_file(weights, str(checkpoint / REFERENCE_DIR / REFERENCE_FILE))

    def load(self, checkpoint: Path) -> None:
        """Resume: the reference as ``checkpoint`` saved it (every rank reads the file)."""
        from safetensors.torch import load_file

        from prefixpo.checkpoint import CheckpointError

        path = checkpoint / REFERENCE_DIR / REFERENCE_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} holds no synced reference ({REFERENCE_DIR}/{REFERENCE_FILE}): it "
                                    "was saved without sync_ref_model; resume it with sync_ref_model: false")
        self.load_weights(load_file(str(path)))


def reference_sync(policy: nn.Module, reference_fn: object, alpha: float, every: int,
                   zero3: bool = False) -> ReferenceSync | None:
    """The ``ReferenceSync`` of the reference model behind ``reference_fn`` (``build_reference``'s,
    which carries it as ``.sample_model``, see ``samples.attach``)."""
    from prefixpo.config import ConfigError
    from prefixpo.modeling import unwrap

    found = getattr(reference_fn, "sample_model", None)  # as held: under FSDP2 a sharded ScoredLM
    module = unwrap(found.model) if found is not None and found.model is not policy else None
    if module is None:
        raise ConfigError("config key `sync_ref_model`: needs a reference model (reference_mode: model)")
    if zero3:
        raise ConfigError("config key `sync_ref_model`: not supported under DeepSpeed ZeRO-3 (its reference is a frozen "
                         "engine's partitions); use FSDP2 (examples/accelerate/fsdp2.yaml) or ZeRO-1/2")
    return ReferenceSync(policy, module, alpha, every)
