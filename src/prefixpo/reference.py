"""The reference model's log-probs, every mode in one place (``build_reference``): a frozen model
(sharded like the policy under FSDP2 or ZeRO-3), the policy with LoRA adapters disabled, or
log-probs precomputed once and cached on disk (then no reference model stays in memory); TR-DPO's
reference updated from the policy (``ReferenceSync``); and the check that policy and reference
agree at step 1 (``check_start_agreement``).

A reference is a function ``(batch, masks) -> ResponseLogps`` given the very masks the policy's
forward used. One whose forward is a collective (a sharded model) is marked ``collective`` and run
on every micro-batch of every rank (``reference_for_step``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn

from prefixpo.checkpoint import CheckpointError
from prefixpo.config import ConfigError, TrainConfig
from prefixpo.data.config import default_cache_dir
from prefixpo.guards import TrainingError
from prefixpo.layout import Batch, Group
from prefixpo.logprobs import DEFAULT_CHUNK_SIZE, ResponseLogps
from prefixpo.losses import loss_requires_reference
from prefixpo.metrics import summed_over_ranks
from prefixpo.modeling import compute_logps, is_config_file, load_model, unwrap, weights_dtype
from prefixpo.packing import batch_rows
from prefixpo.samples import adapters_off, attach

ReferenceFn = Callable[[Batch, object], ResponseLogps]


def reference_from_model(reference: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ReferenceFn:
    """Reference log-probs from a frozen model, fed the same batch and the same masks."""

    @torch.no_grad()
    def fn(batch: Batch, masks: object) -> ResponseLogps:
        return compute_logps(reference, batch, masks, chunk_size)

    return fn


def collective(reference: ReferenceFn) -> ReferenceFn:
    """Mark a reference function whose forward runs collectives (a sharded model)."""
    reference.collective = True
    return reference


def is_collective(reference: object) -> bool:
    """Whether calling ``reference`` runs collectives, so every rank must call it alike."""
    return bool(getattr(reference, "collective", False))


def reference_for_step(reference: ReferenceFn | None, micro_batches: Sequence[Batch],
                       build_masks: Callable[[Batch], object]) -> tuple[ReferenceFn | None, list[object] | None]:
    """``(reference, masks)``: a reference whose forward is collective is run now on every
    micro-batch of the step, and the attention masks it was given are returned for
    ``preference_step`` to use again (built once per micro-batch); any other reference is returned
    as it is, with no masks (the step builds each micro-batch's masks as it goes).

    ``preference_step`` skips the reference on a micro-batch without pairs (an empty padding
    row); with a sharded reference the other ranks would then wait in its all-gathers forever.
    The results are looked up by batch when ``preference_step`` asks for them.
    """
    if reference is None or not is_collective(reference):
        return reference, None
    masks = [build_masks(mb) for mb in micro_batches]
    table: dict[int, ResponseLogps] = {id(mb): reference(mb, m) for mb, m in zip(micro_batches, masks)}

    def lookup(batch: Batch, masks: object) -> ResponseLogps:
        return table[id(batch)]

    return lookup, masks


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
def reference_sums(reference: nn.Module, groups: Sequence[Group], indices: Sequence[int], batch_size: int = 8,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, share_prefix: bool = True) -> list[torch.Tensor]:
    """Reference log-prob sums ``[n_responses]`` (fp32, on CPU) of ``groups[i]`` for each of ``indices``."""
    device = next(reference.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(indices), batch_size):
        rows = [[i] for i in indices[start:start + batch_size]]
        batch = batch_rows(groups, rows, prefix_sharing=share_prefix, pad_to_multiple_of=128).to(device)
        sums = compute_logps(reference, batch, chunk_size=chunk_size).sums.float().cpu()
        out += list(sums.split([len(groups[i].response_ids) for i, in rows]))
    return out


def precompute_reference(reference: nn.Module, groups: Sequence[Group], cache_path: Path,
                         batch_size: int = 8, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         share_prefix: bool = True, accelerator: Any = None) -> list[torch.Tensor]:
    """Per-group reference log-prob sums ``[n_responses]`` (fp32, on CPU), computed once and cached.

    With an ``accelerator`` of several processes, each computes every world-size-th group and the
    shares are gathered, so no process waits for another to compute them all (a wait that long
    would outlast the collective timeout on a large dataset); every node's first process writes the
    cache. The processes agree on whether the cache is there before any of them reads it, and
    must hold the same groups (the cache entry's name carries their fingerprint)."""
    world = accelerator.num_processes if accelerator is not None else 1
    found = cache_path.is_file()
    if world > 1:
        views = gather_object([(found, cache_path.name, len(groups))])
        if len({view[1:] for view in views}) > 1:  # each share would land on another rank's groups
            raise TrainingError("the processes hold different data for the precomputed reference (cache entries "
                                f"{sorted({v[1] for v in views})}, group counts {sorted({v[2] for v in views})}); "
                                "every process must load the same dataset, max_samples and seed")
        found = all(view[0] for view in views)
    if found:
        return torch.load(cache_path, weights_only=True)
    rank = accelerator.process_index if world > 1 else 0
    out = reference_sums(reference, groups, range(rank, len(groups), world), batch_size, chunk_size, share_prefix)
    if world > 1:  # every rank's share, back in the groups' order
        shares = gather_object([(rank, torch.cat(out) if out else torch.zeros(0), [len(t) for t in out])])
        out = [torch.zeros(0)] * len(groups)
        for r, flat, lengths in shares:
            for i, sums in zip(range(r, len(groups), world), flat.split(lengths)):
                out[i] = sums
    if world == 1 or accelerator.is_local_main_process:
        _write_cache(out, cache_path)
    return out


def _write_cache(per_group: list[torch.Tensor], cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # a file of this process's own, renamed into place: processes of other nodes on a shared disk
    # may write the same entry at once
    handle, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=f"{cache_path.name}.tmp-")
    os.close(handle)
    try:
        torch.save(per_group, tmp)
        os.replace(tmp, cache_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        (checkpoint / REFERENCE_DIR).mkdir(exist_ok=True)
        save_file(weights, str(checkpoint / REFERENCE_DIR / REFERENCE_FILE))

    def load(self, checkpoint: Path) -> None:
        """Resume: the reference as ``checkpoint`` saved it (every rank reads the file)."""
        path = checkpoint / REFERENCE_DIR / REFERENCE_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} holds no synced reference ({REFERENCE_DIR}/{REFERENCE_FILE}): it "
                                    "was saved without sync_ref_model; resume it with sync_ref_model: false")
        self.load_weights(load_file(str(path)))


def reference_sync(policy: nn.Module, reference_fn: object, alpha: float, every: int,
                   zero3: bool = False) -> ReferenceSync | None:
    """The ``ReferenceSync`` of the reference model behind ``reference_fn`` (``build_reference``'s,
    which carries it as ``.sample_model``, see ``samples.attach``)."""
    found = getattr(reference_fn, "sample_model", None)  # as held: under FSDP2 a sharded ScoredLM
    module = unwrap(found.model) if found is not None and found.model is not policy else None
    if module is None:
        raise ConfigError("config key `sync_ref_model`: needs a reference model (reference_mode: model)")
    if zero3:
        raise ConfigError("config key `sync_ref_model`: not supported under DeepSpeed ZeRO-3 (its reference is a frozen "
                         "engine's partitions); use FSDP2 (examples/accelerate/fsdp2.yaml) or ZeRO-1/2")
    return ReferenceSync(policy, module, alpha, every)


# --- every mode in one place --------------------------------------------------------------------

def resolve_mode(cfg: TrainConfig) -> str:
    """The reference mode a stage runs: ``none`` (SFT, reference-free losses), ``adapters_off``,
    ``model`` or ``precomputed``; ``auto`` is ``adapters_off`` for LoRA without a reference model."""
    if cfg.stage == "sft" or not loss_requires_reference(cfg.loss_type, cfg.reference_free):
        if cfg.reference_mode not in ("auto", "none"):
            print(f"note: loss {cfg.loss_type} needs no reference; reference_mode ignored", file=sys.stderr)
        return "none"
    if cfg.reference_mode == "none":
        raise ConfigError(f"config key `reference_mode`: loss {cfg.loss_type} needs a reference model")
    if cfg.reference_mode == "auto":
        return "adapters_off" if cfg.use_peft and not cfg.ref_model_name_or_path else "model"
    return cfg.reference_mode


def build_reference(cfg: TrainConfig, engine: Any, train_groups: Sequence[Group],
                    eval_groups: Sequence[Group]) -> tuple[ReferenceFn | None, ReferenceFn | None, str]:
    """``(train reference, eval reference, mode)``: a function per data split (None for none).

    ``engine``: the run's ``prefixpo.engine`` engine, its policy prepared. A frozen reference model
    is loaded, placed and sharded as the engine does it (FSDP2 or a frozen ZeRO-3 engine: 1/world
    of it per rank, its forward a collective; otherwise a whole copy per rank)."""
    mode = resolve_mode(cfg)
    if mode == "none":
        return None, None, mode
    if mode == "adapters_off":
        sharded = engine.name != "none"
        fn = reference_from_adapters_off(engine.policy, cfg.logps_chunk_size, through_wrapper=sharded)
        fn = attach(collective(fn) if sharded else fn, engine.policy, adapters_off(engine.policy))  # for samples
        return fn, fn, mode
    source = cfg.ref_model_name_or_path or cfg.model_name_or_path
    # a precomputed reference runs without an engine, and random weights are drawn whole: loaded whole
    with engine.loading(whole=mode == "precomputed" or is_config_file(source), reference=True):
        model = load_model(source, dtype=weights_dtype(cfg.bf16), seed=cfg.seed, load_in_4bit=cfg.load_in_4bit,
                           trust_remote_code=cfg.trust_remote_code).eval().requires_grad_(False)
    model = engine.apply_attention(engine.place(model))
    if mode == "model":
        model, is_sharded = engine.shard_reference(model)
        fn = reference_from_model(model, cfg.logps_chunk_size)
        fn = attach(collective(fn) if is_sharded else fn, model)  # generate_during_eval samples it, TR-DPO updates it
        return fn, fn, mode
    fns = [precomputed(cfg, model, source, groups, engine.accelerator) if groups else None
           for groups in (train_groups, eval_groups)]
    return fns[0], fns[1], mode  # no reference model stays in memory


def precomputed(cfg: TrainConfig, model: nn.Module, source: str, groups: Sequence[Group], accelerator: Any) -> ReferenceFn:
    """The reference log-probs of ``groups``, computed once, a share on each process (one process
    per node writes the cache)."""
    key = model_fingerprint(source, cfg.seed, "bf16" if cfg.bf16 else "fp32")
    path = Path(default_cache_dir()).parent / "reference" / \
        f"{key}-{groups_fingerprint(groups)}-{int(cfg.prefix_sharing)}.pt"
    per_group = precompute_reference(model, groups, path, cfg.per_device_eval_batch_size, cfg.logps_chunk_size,
                                     cfg.prefix_sharing, accelerator=accelerator)
    return reference_from_cache(per_group)


# --- policy and reference agree at the start ----------------------------------------------------

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
    gap = reference_disagreement(summed_over_ranks(accelerator, metrics), beta)
    if gap is not None and gap > START_AGREEMENT:
        raise TrainingError(
            f"at step 1 the policy and the reference model, loaded from the same weights, disagree by "
            f"{100 * gap:.1f}% of their summed log-probs (rounding gives ~0.01%): the two models do not run the "
            "same computation. Check that both use the same attention_backend and dtype; run `prefixpo verify` "
            "for the model; under FSDP or DeepSpeed, compare with a single-process run.")
