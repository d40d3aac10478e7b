"""Timing one mode: its step, its warm-up, the timed loop and what is measured (docs/benchmarks.md).

A step is: policy forward+backward over its micro-batches, the frozen reference's forward on the
same micro-batches (sharing the block mask), the loss over all pairs of the step, one AdamW step.
Warm-up runs the first steps and then every micro-batch shape the timed steps will use, so the
timed loop compiles nothing; the timed loop has no host syncs (one synchronize at its end).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

from prefixpo.bench.baseline import SeparateBatch, separate_micro_batches, separate_step
from prefixpo.bench.flops import step_flops
from prefixpo.bench.layouts import (
    MODES,
    MicroBatch,
    separate_packed_micro_batches,
    shared_micro_batches,
    shared_packed_micro_batches,
)
from prefixpo.bench.models import set_compiled, set_mode_attention
from prefixpo.layout import Group
from prefixpo.losses import get_loss
from prefixpo.metrics import idle_share
from prefixpo.modeling import build_attention_masks
from prefixpo.packing import split_rows_over_ranks
from prefixpo.reference import reference_from_model
from prefixpo.step import preference_step

# modes whose rows come from a few bucketed lengths: their layers compile statically, once per length;
# `separate` (TRL's recipe) and the unpacked `shared` rows change length every batch and run eager
COMPILED_MODES = ("separate-packed", "shared-packed")
Triple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class BenchSettings:
    """What every mode of a run shares: the prefixpo attention ``backend``, the packed row
    ``capacity`` and its ``num_buckets`` lengths, ``micro_pairs`` of the unpacked modes, the
    layout ``seed``, AdamW's ``lr``, ``compile_model`` (the packed modes' layers), the model's
    ``dims`` and ``peak_flops`` (for MFU), and the data-parallel ``ranks`` of the idle estimate."""

    backend: str
    capacity: int
    micro_pairs: int
    num_buckets: int
    seed: int
    lr: float
    compile_model: bool
    dims: dict[str, int]
    peak_flops: float | None
    ranks: Sequence[int]


# --- one step ------------------------------------------------------------------------------------

def layout_step(mode: str, groups: Sequence[Group], capacity: int, micro_pairs: int, num_buckets: int = 4,
                seed: int = 0) -> list[MicroBatch]:
    """The micro-batches of one step's groups (each a (chosen, rejected) pair) in ``mode``."""
    if mode == "separate":
        return separate_micro_batches(groups, micro_pairs)
    if mode == "shared":
        return shared_micro_batches(groups, micro_pairs)
    if mode == "shared-packed":
        return shared_packed_micro_batches(groups, capacity, num_buckets, seed)
    if mode == "separate-packed":
        return separate_packed_micro_batches(groups, capacity, num_buckets, seed)
    raise ValueError(f"unknown mode {mode!r}; the modes are: {', '.join(MODES)}")


def micro_batch_triples(mb: MicroBatch) -> list[Triple]:
    """``(prompt, chosen, rejected)`` token tuples of every pair, read back from the tensors."""
    b = mb.batch
    if isinstance(b, SeparateBatch):
        rows = [(b.input_ids[i, :int(b.prompt_lengths[i])].tolist(),
                 b.input_ids[i, int(b.prompt_lengths[i]):int(b.lengths[i])].tolist()) for i in range(b.shape[0])]
    else:
        ids, doc, seg = b.input_ids.flatten(), b.document_ids.flatten(), b.segment_ids.flatten()
        responses = b.scored_targets.split(b.response_lengths.tolist())
        rows = [(ids[(doc == int(b.response_group[i])) & (seg == 0)].tolist(), responses[i].tolist())
                for i in range(b.num_responses)]
    out = []
    for c, r in zip(mb.chosen_idx.tolist(), mb.rejected_idx.tolist()):
        if rows[c][0] != rows[r][0]:
            raise AssertionError("a pair's chosen and rejected responses have different prompts")
        out.append((tuple(rows[c][0]), tuple(rows[c][1]), tuple(rows[r][1])))
    return out


def bench_step(policy: nn.Module, reference: nn.Module, micro_batches: Sequence[MicroBatch], loss_fn: Callable,
               num_pairs: int, events: Sequence[tuple] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward+backward of one step (no optimizer update), without host syncs: the step's mean loss
    and the sum of the policy's chosen + rejected log-probs, as device tensors. The prefixpo modes
    run the trainer's own ``step.preference_step`` (pairs found on the host beforehand), one
    micro-batch at a time so that ``events`` (a (start, end) CUDA event pair per micro-batch) can
    time each on the device."""
    device = next(policy.parameters()).device
    loss = torch.zeros((), device=device)
    logps = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        if events:
            events[i][0].record()
        if isinstance(mb.batch, SeparateBatch):
            mb_loss, mb_logps = separate_step(policy, reference, [mb], loss_fn, num_pairs)
        else:
            result = preference_step(policy, [mb.batch], loss_fn, reference_from_model(reference),
                                     pairs=[mb.pairs()], num_pairs=num_pairs)
            mb_loss = result.loss_tensor
            mb_logps = result.metric_sums["logps/chosen"] + result.metric_sums["logps/rejected"]
        loss += mb_loss
        logps += mb_logps
        if events:
            events[i][1].record()
    return loss, logps


def rank_idle(micro_batch_ms: Sequence[float], tokens: Sequence[int], ranks: int, seed: int) -> float:
    """Share of the step the other ranks wait for the slowest, ``1 - mean/max`` of per-rank time,
    when the step's micro-batches are dealt to ``ranks`` ranks the trainer's way (by tokens,
    ``packing.split_rows_over_ranks``) and each takes the time it was measured to take.

    >>> rank_idle([3.0, 1.0, 2.0, 2.0], [30, 10, 20, 20], ranks=2, seed=0)
    0.0
    """
    dealt = split_rows_over_ranks([[i] for i in range(len(tokens))], list(tokens), ranks, seed)
    return idle_share([sum(micro_batch_ms[i] for row in rows for i in row) for rows in dealt])


# --- timing one mode -----------------------------------------------------------------------------

@dataclass
class Measured:
    """What one mode's run measured: its ``plans`` (micro-batches per step, warm-up steps first)
    and ``num_pairs`` per step; the warm-up's (loss, log-probs) per step in ``warm``, its seconds and
    compilations; the timed loop's device outputs, wall seconds and recompilations; peak memory;
    per-micro-batch device ms of the timed steps (CUDA only); block-mask build seconds."""

    mode: str
    compiled: bool
    plans: list[list[MicroBatch]]
    num_pairs: list[int]
    warmup: int
    warm: list[list[float]]
    warmup_s: float
    compiles_in_warmup: int
    outputs: list[tuple[torch.Tensor, torch.Tensor]]
    elapsed: float
    recompiles: int
    peak_gib: float | None
    micro_ms: list[list[float]] | None
    mask_s: float

    @property
    def timed(self) -> range:
        return range(self.warmup, len(self.plans))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _device_ms(events: Sequence[tuple]) -> list[float]:
    return [start.elapsed_time(end) for start, end in events]


def prepare_mode(mode: str, policy: nn.Module, reference: nn.Module, settings: BenchSettings) -> bool:
    """Set both models up for ``mode`` (attention, compiled layers or eager), the policy back at the
    reference's weights, so every mode starts from the same weights; whether layers are compiled."""
    set_mode_attention([policy, reference], mode, settings.backend)
    compiled = settings.compile_model and mode in COMPILED_MODES
    set_compiled([policy, reference], compiled)
    policy.load_state_dict(reference.state_dict())
    policy.zero_grad(set_to_none=True)
    return compiled


def plan_steps(mode: str, steps: Sequence[Sequence[Group]], settings: BenchSettings,
               device: torch.device) -> list[list[MicroBatch]]:
    """Every step's micro-batches in ``mode``, moved to ``device`` before anything is timed."""
    return [[mb.to(device) for mb in layout_step(mode, g, settings.capacity, settings.micro_pairs,
                                                  settings.num_buckets, seed=settings.seed + s)]
            for s, g in enumerate(steps)]


def warm_up(policy: nn.Module, reference: nn.Module, plans: Sequence[Sequence[MicroBatch]], num_pairs: Sequence[int],
            warmup: int, optimizer: torch.optim.Optimizer, loss_fn: Callable, every_shape: bool) -> list[list[float]]:
    """``warmup`` real steps, then (``every_shape``) one forward+backward without update of every
    micro-batch shape of the later steps not seen yet; the warm-up steps' (loss, log-probs)."""
    warm = []
    for s in range(warmup):
        optimizer.zero_grad(set_to_none=True)
        warm.append([float(x) for x in bench_step(policy, reference, plans[s], loss_fn, num_pairs[s])])
        optimizer.step()
    seen = {mb.batch.shape for plan in plans[:warmup] for mb in plan}
    if every_shape:
        for plan in plans[warmup:]:
            for mb in plan:
                if mb.batch.shape not in seen:
                    seen.add(mb.batch.shape)
                    bench_step(policy, reference, [mb], loss_fn, mb.num_pairs)
        optimizer.zero_grad(set_to_none=True)
    return warm


def timed_loop(policy: nn.Module, reference: nn.Module, plans: Sequence[Sequence[MicroBatch]],
               num_pairs: Sequence[int], optimizer: torch.optim.Optimizer, loss_fn: Callable,
               device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, list | None]:
    """The timed steps, with no host sync inside: their device outputs, the wall seconds of the
    loop, and (CUDA) a (start, end) event pair per micro-batch."""
    events = ([[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in plan]
               for plan in plans] if device.type == "cuda" else None)
    _sync(device)
    start = time.perf_counter()
    outputs = []
    for s, plan in enumerate(plans):
        optimizer.zero_grad(set_to_none=True)
        outputs.append(bench_step(policy, reference, plan, loss_fn, num_pairs[s], events[s] if events else None))
        optimizer.step()
    _sync(device)
    return outputs, time.perf_counter() - start, events


def mask_build_seconds(policy: nn.Module, plans: Sequence[Sequence[MicroBatch]], device: torch.device) -> float:
    """Seconds of ``build_attention_masks`` over every micro-batch of ``plans``, each build between
    two synchronizes (a loop of its own, so the timed loop stays free of syncs)."""
    total = 0.0
    for plan in plans:
        for mb in plan:
            _sync(device)
            t0 = time.perf_counter()
            build_attention_masks(policy, mb.batch)
            _sync(device)
            total += time.perf_counter() - t0
    return total


def run_mode(mode: str, policy: nn.Module, reference: nn.Module, steps: Sequence[Sequence[Group]], warmup: int,
             settings: BenchSettings) -> dict[str, Any]:
    """Warm up, time, and measure one mode on ``steps`` (lists of groups); returns its result row."""
    device = next(policy.parameters()).device
    compiled = prepare_mode(mode, policy, reference, settings)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr, fused=device.type == "cuda")
    loss_fn = get_loss("sigmoid", beta=0.1)
    plans = plan_steps(mode, steps, settings, device)
    num_pairs = [sum(mb.num_pairs for mb in plan) for plan in plans]
    compiles_before = _unique_graphs()
    t_warm = time.perf_counter()
    warm = warm_up(policy, reference, plans, num_pairs, warmup, optimizer, loss_fn,
                   every_shape=mode != "separate" or compiled)
    _sync(device)
    warmup_s = time.perf_counter() - t_warm
    compiles_warm = _unique_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs, elapsed, events = timed_loop(policy, reference, plans[warmup:], num_pairs[warmup:], optimizer,
                                          loss_fn, device)
    recompiles = _unique_graphs() - compiles_warm
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    micro_ms = [_device_ms(ev) for ev in events] if events else None
    mask_s = mask_build_seconds(policy, plans[warmup:], device) if mode != "separate" else 0.0
    del optimizer
    policy.zero_grad(set_to_none=True)
    measured = Measured(mode, compiled, plans, num_pairs, warmup, warm, warmup_s, compiles_warm - compiles_before,
                        outputs, elapsed, recompiles, peak, micro_ms, mask_s)
    return result_row(measured, settings)


# --- the result row ------------------------------------------------------------------------------

def rank_idle_pct(m: Measured, settings: BenchSettings) -> dict[str, float] | None:
    """Per rank count: mean over the timed steps of ``rank_idle`` in percent (None without CUDA
    event times)."""
    if not m.micro_ms:
        return None
    idle = {}
    for r in settings.ranks:
        idle[str(r)] = 100 * sum(rank_idle(ms, [mb.tokens for mb in m.plans[s]], r, settings.seed + s)
                                 for s, ms in zip(m.timed, m.micro_ms)) / len(m.micro_ms)
    return idle or None


def result_row(m: Measured, settings: BenchSettings) -> dict[str, Any]:
    """One mode's JSON line: throughput, tokens and padding, FLOPs and MFU, memory, mask build,
    rank idle share, compilations, and the losses and log-probs of every step."""
    timed, elapsed = m.timed, m.elapsed
    n_timed = max(len(timed), 1)
    sums = {k: sum(getattr(mb, k) for s in timed for mb in m.plans[s])
            for k in ("tokens", "padded_tokens", "attention_pairs", "scored")}
    flops = step_flops(settings.dims, sums["tokens"], sums["attention_pairs"], sums["scored"])
    masks = m.mode != "separate"
    return {
        "mode": m.mode, "compiled": m.compiled, "pairs_per_step": m.num_pairs[0], "timed_steps": len(timed),
        "warmup_steps": m.warmup, "micro_batches_per_step": sum(len(m.plans[s]) for s in timed) / n_timed,
        "shapes": sorted({"x".join(map(str, mb.batch.shape)) for p in m.plans for mb in p}),
        "step_ms": round(1e3 * elapsed / n_timed, 2), "pairs_per_s": sum(m.num_pairs[s] for s in timed) / elapsed,
        "tokens_per_s": sums["tokens"] / elapsed,
        "tokens_per_step": sums["tokens"] / n_timed,
        "padded_tokens_per_step": sums["padded_tokens"] / n_timed,
        "padding_fraction": 1 - sums["tokens"] / max(sums["padded_tokens"], 1),
        "attention_pairs_per_step": sums["attention_pairs"] / n_timed,
        "scored_tokens_per_step": sums["scored"] / n_timed,
        "model_tflops_per_step": flops / n_timed / 1e12,
        "achieved_tflops": flops / elapsed / 1e12,
        "mfu": flops / elapsed / settings.peak_flops if settings.peak_flops else None,
        "peak_gib": m.peak_gib,
        "forward_backward_pct_of_step": (100 * sum(map(sum, m.micro_ms)) / 1e3 / elapsed) if m.micro_ms else None,
        "rank_idle_pct": rank_idle_pct(m, settings),
        "mask_build_ms_per_step": 1e3 * m.mask_s / n_timed if masks else None,
        "mask_build_pct_of_step": 100 * m.mask_s / elapsed if masks else None,
        "recompiles_after_warmup": m.recompiles, "compiles_in_warmup": m.compiles_in_warmup,
        "warmup_s": round(m.warmup_s, 2),
        "losses": [w[0] for w in m.warm] + [float(o[0]) for o in m.outputs],
        "policy_logps": [w[1] for w in m.warm] + [float(o[1]) for o in m.outputs],
    }
