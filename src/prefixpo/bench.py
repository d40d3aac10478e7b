"""``prefixpo bench``: time real preference-training steps in four layouts of the SAME pairs.

Every step draws its groups (one prompt, a chosen and a rejected response) first; each mode then
lays the same pairs out its own way (docs/benchmarks.md)::

    separate         TRL's DPO: chosen and rejected rows stacked, right-padded, transformers' sdpa
                     with a 2-D padding mask, full logits -> log_softmax -> gather
    separate-packed  every prompt+response its own single-response group, packed (document mask)
    shared           prefix sharing, one group per row, rows padded to a bucket (multiple of 128)
    shared-packed    prefix sharing and packing into rows of ``--capacity`` tokens, bucketed

A step is: policy forward+backward over its micro-batches, the frozen reference's forward on the
same micro-batches (sharing the block mask), the loss over all pairs of the step, one AdamW step.
Warm-up runs the first steps and then every micro-batch shape the timed steps will use, so the
timed loop compiles nothing; the timed loop has no host syncs (one synchronize at its end).
The attention microbenchmark is ``prefixpo bench --attention`` (``prefixpo.bench_attention``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefixpo.layout import Batch, Group, build_batch, layout_group
from prefixpo.packing import bucket_lengths, pack, row_length, split_rows_over_ranks
from prefixpo.pairs import BatchPairs

MODES = ("separate", "separate-packed", "shared", "shared-packed")
# modes whose rows come from a few bucketed lengths: their layers compile statically, once per length;
# `separate` (TRL's recipe) and the unpacked `shared` rows change length every batch and run eager
COMPILED_MODES = ("separate-packed", "shared-packed")
PEAKS_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM (NVIDIA datasheet)


# --- laying out one step's pairs in each mode ----------------------------------------------------

@dataclass
class SeparateBatch:
    """TRL's layout: ``2k`` rows, chosen rows ``0..k-1`` then rejected rows ``k..2k-1``, each
    prompt+response from position 0, right-padded. ``input_ids``, ``attention_mask``,
    ``completion_mask``: ``[2k, T]``; ``prompt_lengths``, ``lengths``: ``[2k]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device, non_blocking: bool = False) -> SeparateBatch:
        return SeparateBatch(**{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})


@dataclass
class MicroBatch:
    """One micro-batch of a mode and its pairs. ``chosen_idx``/``rejected_idx`` index the
    per-response (per-row for separate) log-probs; ``chosen_len``/``rejected_len`` are the
    responses' scored tokens. ``tokens``: real tokens; ``padded_tokens``: rows x T;
    ``attention_pairs``: allowed (q, k) pairs of the real tokens; ``scored``: scored tokens."""

    batch: Batch | SeparateBatch
    chosen_idx: torch.Tensor
    rejected_idx: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    tokens: int
    padded_tokens: int
    attention_pairs: int
    scored: int

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_idx.numel())

    def to(self, device) -> MicroBatch:
        return MicroBatch(self.batch.to(device), *(t.to(device) for t in (self.chosen_idx, self.rejected_idx,
                                                                            self.chosen_len, self.rejected_len)),
                          self.tokens, self.padded_tokens, self.attention_pairs, self.scored)

    def pairs(self) -> BatchPairs:
        return BatchPairs(self.chosen_idx, self.rejected_idx, torch.arange(self.num_pairs), [])


def causal_pairs(n: int) -> int:
    """Allowed (q, k) pairs of a causal sequence of ``n`` tokens: ``n (n + 1) / 2``.

    >>> causal_pairs(4)
    10
    """
    return n * (n + 1) // 2


def shared_attention_pairs(group: Group) -> int:
    """Allowed (q, k) pairs of a group's shared layout: the prompt causally, and every response
    to the prompt and causally to itself (``p p | a a | b`` -> 3 + 2*2 + 3 + 1*2 + 1 = 13).

    >>> shared_attention_pairs(Group([1, 2], [[3, 4], [5]]))
    13
    """
    p = len(group.prompt_ids)
    return causal_pairs(p) + sum(len(r) * p + causal_pairs(len(r)) for r in group.response_ids)


def separate_attention_pairs(group: Group) -> int:
    """Allowed (q, k) pairs when every prompt+response is its own causal sequence.

    >>> separate_attention_pairs(Group([1, 2], [[3, 4], [5]]))
    16
    """
    p = len(group.prompt_ids)
    return sum(causal_pairs(p + len(r)) for r in group.response_ids)


def shared_row_buckets(longest: int) -> list[int]:
    """Row lengths of the unpacked shared mode: multiples of 128, at most 25% apart above 512,
    so rows waste little padding and compiled kernels see few shapes.

    >>> shared_row_buckets(1100)
    [128, 256, 384, 512, 640, 768, 896, 1024, 1280]
    """
    buckets, n = [128, 256, 384, 512], 512
    while buckets[-1] < longest:
        buckets += [n * k // 4 for k in (5, 6, 7, 8)]
        n *= 2
    return [b for i, b in enumerate(buckets) if i == 0 or buckets[i - 1] < longest]


def _micro_batch(batch: Batch, chosen: list[int], rejected: list[int], groups: Sequence[Group], separate: bool,
                 ) -> MicroBatch:
    lengths = batch.response_lengths
    return MicroBatch(batch, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long),
                      lengths[chosen], lengths[rejected], int((batch.document_ids >= 0).sum()),
                      batch.input_ids.numel(),
                      sum(map(separate_attention_pairs if separate else shared_attention_pairs, groups)),
                      int(batch.scored_targets.numel()))


def separate_micro_batch(groups: Sequence[Group], pad_token_id: int = 0) -> MicroBatch:
    """TRL's concatenated batch of ``k`` pairs: ``2k`` right-padded rows (chosen rows, then rejected)."""
    rows = [(g.prompt_ids, g.response_ids[i]) for i in (0, 1) for g in groups]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    completion = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
        attention[i, :len(p) + len(r)] = 1
        completion[i, len(p):len(p) + len(r)] = True
    k = len(groups)
    batch = SeparateBatch(ids, attention, completion, torch.tensor([len(p) for p, _ in rows]),
                          torch.tensor([len(p) + len(r) for p, r in rows]))
    resp = torch.tensor([len(r) for _, r in rows])
    return MicroBatch(batch, torch.arange(k), torch.arange(k, 2 * k), resp[:k], resp[k:],
                      int(attention.sum()), ids.numel(), sum(map(separate_attention_pairs, groups)),
                      int(resp.sum()))


def layout_step(mode: str, groups: Sequence[Group], capacity: int, micro_pairs: int, num_buckets: int = 4,
                seed: int = 0) -> list[MicroBatch]:
    """The micro-batches of one step's groups (each a (chosen, rejected) pair) in ``mode``."""
    if mode == "separate":
        return [separate_micro_batch(groups[i:i + micro_pairs]) for i in range(0, len(groups), micro_pairs)]
    if mode == "shared":
        out = []
        for i in range(0, len(groups), micro_pairs):
            chunk = groups[i:i + micro_pairs]
            longest = max(g.num_tokens for g in chunk)
            batch = build_batch([[layout_group(g)] for g in chunk],
                                row_length=row_length(longest, shared_row_buckets(longest)))
            out.append(_micro_batch(batch, list(range(0, 2 * len(chunk), 2)),
                                    list(range(1, 2 * len(chunk), 2)), chunk, separate=False))
        return out
    buckets = bucket_lengths(capacity, num_buckets)
    if mode == "shared-packed":
        rows = pack([g.num_tokens for g in groups], capacity, seed=seed)
        out = []
        for row in rows:
            used = sum(groups[i].num_tokens for i in row)
            batch = build_batch([[layout_group(groups[i]) for i in row]], row_length=row_length(used, buckets))
            n = len(row)
            out.append(_micro_batch(batch, list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)),
                                    [groups[i] for i in row], separate=False))
        return out
    if mode == "separate-packed":
        # a pair's two sequences are packed as one unit, so a pair never spans micro-batches
        rows = pack([g.num_separate_tokens for g in groups], capacity, seed=seed)
        out = []
        for row in rows:
            singles = [Group(groups[i].prompt_ids, [groups[i].response_ids[j]]) for i in row for j in (0, 1)]
            used = sum(s.num_tokens for s in singles)
            batch = build_batch([[layout_group(s) for s in singles]], row_length=row_length(used, buckets))
            n = len(row)
            out.append(_micro_batch(batch, list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)),
                                    [groups[i] for i in row], separate=True))
        return out
    raise ValueError(f"unknown mode {mode!r}; the modes are: {', '.join(MODES)}")


def micro_batch_triples(mb: MicroBatch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``(prompt, chosen, rejected)`` token tuples of every pair, read back from the tensors."""
    b = mb.batch
    out = []
    if isinstance(b, SeparateBatch):
        rows = [(b.input_ids[i, :int(b.prompt_lengths[i])].tolist(),
                 b.input_ids[i, int(b.prompt_lengths[i]):int(b.lengths[i])].tolist()) for i in range(b.shape[0])]
    else:
        ids, doc, seg = b.input_ids.flatten(), b.document_ids.flatten(), b.segment_ids.flatten()
        responses = b.scored_targets.split(b.response_lengths.tolist())
        rows = [(ids[(doc == int(b.response_group[i])) & (seg == 0)].tolist(), responses[i].tolist())
                for i in range(b.num_responses)]
    for c, r in zip(mb.chosen_idx.tolist(), mb.rejected_idx.tolist()):
        if rows[c][0] != rows[r][0]:
            raise AssertionError("a pair's chosen and rejected responses have different prompts")
        out.append((tuple(rows[c][0]), tuple(rows[c][1]), tuple(rows[r][1])))
    return out


def default_pairs_per_step(groups: Sequence[Group], tokens: int, micro_pairs: int) -> int:
    """As many groups as fill ``tokens`` on average, rounded down to a multiple of ``micro_pairs``."""
    mean = sum(g.num_tokens for g in groups) / len(groups)
    fill = max(1, int(tokens // mean))
    return max(micro_pairs, fill // micro_pairs * micro_pairs) if fill >= micro_pairs else fill


def fit_both_layouts(group: Group, capacity: int) -> Group:
    """Shorten a group (packing.fit_group's rule) until even its separate layout fits a row."""
    from prefixpo.packing import fit_group

    while group.num_separate_tokens > capacity:
        group = fit_group(group, group.num_tokens - 1)
    return group


# --- the step --------------------------------------------------------------------------------------

def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py): log-probs ``[B, T]`` of ``index`` under
    ``logits [B, T, V]``; fp32 by logsumexp row by row, other dtypes by log_softmax row by row."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def separate_batch_logps(model: nn.Module, batch: SeparateBatch) -> torch.Tensor:
    """Summed response log-probs ``[2k]`` the way TRL's DPOTrainer computes them: the model's own
    forward (2-D padding mask), full logits, shifted labels, completion mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.input_ids[:, 1:]
    token_logps = selective_log_softmax(logits[:, :-1], labels)
    return token_logps.masked_fill(~batch.completion_mask[:, 1:], 0.0).float().sum(-1)


def separate_step(policy: nn.Module, reference: nn.Module, micro_batches: Sequence[MicroBatch], loss_fn,
                  num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``separate`` mode's forward+backward (TRL's recipe, the baseline): the step's mean loss and
    the sum of the policy's chosen + rejected log-probs, as device tensors (no host sync)."""
    device = next(policy.parameters()).device
    loss_sum = torch.zeros((), device=device)
    logps_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        pi = separate_batch_logps(policy, mb.batch)
        with torch.no_grad():
            ref = separate_batch_logps(reference, mb.batch)
        c, r = mb.chosen_idx, mb.rejected_idx
        losses, _ = loss_fn(pi[c], pi[r], ref[c], ref[r], mb.chosen_len, mb.rejected_len)
        loss = losses.sum()
        (loss / num_pairs).backward()
        loss_sum += loss.detach()
        logps_sum += (pi[c] + pi[r]).detach().sum()
    return loss_sum / num_pairs, logps_sum


def bench_step(policy: nn.Module, reference: nn.Module, micro_batches: Sequence[MicroBatch], loss_fn,
               num_pairs: int, events: Sequence[tuple] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward+backward of one step (no optimizer update), without host syncs: the step's mean loss
    and the sum of the policy's chosen + rejected log-probs, as device tensors. The prefixpo modes
    run the trainer's own ``step.preference_step`` (pairs found on the host beforehand), one
    micro-batch at a time so that ``events`` (a (start, end) CUDA event pair per micro-batch) can
    time each on the device."""
    from prefixpo.reference import reference_from_model
    from prefixpo.step import preference_step

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
    from prefixpo.metrics import idle_share

    dealt = split_rows_over_ranks([[i] for i in range(len(tokens))], list(tokens), ranks, seed)
    return idle_share([sum(micro_batch_ms[i] for row in rows for i in row) for rows in dealt])


# --- models and FLOPs -------------------------------------------------------------------------------

def model_config(name: str, profiles: dict):
    """A transformers config from a key of the profiles' ``models`` or a config JSON path."""
    from transformers import AutoConfig

    if name in profiles.get("models", {}):
        spec = dict(profiles["models"][name])
        model_type = spec.pop("architecture").removesuffix("ForCausalLM").lower()
    elif name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            spec = json.load(f)
        model_type = spec.pop("model_type")
    else:
        raise ValueError(f"unknown model {name!r}: give a key of the profiles' models "
                         f"({', '.join(profiles.get('models', {}))}) or a config JSON path")
    return AutoConfig.for_model(model_type, **spec)


def build_models(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Policy (random weights from ``seed``, built on ``device``) and a frozen copy as reference."""
    from prefixpo.modeling import load_model

    policy = load_model(config, dtype=dtype, seed=seed, device=device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy.train(), reference


def model_dims(model: nn.Module) -> dict[str, int]:
    """Non-embedding parameters and the shapes that attention and lm_head FLOPs need."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    nonembedding = total - embed.numel() - (0 if head is embed else head.numel())
    heads = cfg.num_attention_heads
    return {"params_nonembedding": nonembedding, "layers": cfg.num_hidden_layers, "heads": heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "vocab": head.shape[0], "hidden": head.shape[1]}


def step_flops(dims: dict[str, int], tokens: int, attention_pairs: int, scored: int) -> float:
    """Model FLOPs of one step: policy fwd+bwd (3x forward) and reference fwd (1x) of
    ``tokens`` through the non-embedding weights (2 N per token forward), attention over the
    allowed (q, k) pairs (QK^T and PV: 4 heads head_dim per pair per layer forward), and lm_head at
    the scored tokens (2 V H per token forward)."""
    forward = (2 * dims["params_nonembedding"] * tokens
               + 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * attention_pairs
               + 2 * dims["vocab"] * dims["hidden"] * scored)
    return 4.0 * forward  # 3 forwards' worth for the policy, 1 for the reference


# --- timing one mode ----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def set_mode_attention(models: Sequence[nn.Module], mode: str, backend: str) -> None:
    from prefixpo.modeling import apply_prefix_attention, remove_prefix_attention

    for m in models:
        remove_prefix_attention(m, "sdpa")  # plain sdpa first: apply's output-head check runs on it
        if mode != "separate":
            apply_prefix_attention(m, backend, self_check=False)


def set_compiled(models: Sequence[nn.Module], on: bool) -> None:
    """``torch.compile`` every decoder layer (static shapes: one graph per bucketed row length, as
    symbolic lengths made FlexAttention 1.8x slower, docs/benchmarks.md), or switch back to eager.

    Each layer is compiled once; switching keeps the compiled forward aside (``nn.Module.compile``
    stores it in ``_compiled_call_impl``), so a mode that runs eager costs no recompilation later."""
    from prefixpo.modeling import decoder_of

    for m in models:
        for layer in decoder_of(m).layers:
            if on and getattr(layer, "_prefixpo_compiled", None) is None:
                layer.compile(dynamic=False)
                layer._prefixpo_compiled = layer._compiled_call_impl
            layer._compiled_call_impl = getattr(layer, "_prefixpo_compiled", None) if on else None


def _device_ms(events: Sequence[tuple]) -> list[float]:
    return [start.elapsed_time(end) for start, end in events]


def run_mode(mode: str, policy: nn.Module, reference: nn.Module, steps: Sequence[Sequence[Group]], warmup: int,
             settings: dict) -> dict:
    """Warm up, time, and measure one mode on ``steps`` (lists of groups); returns its result row."""
    from prefixpo.losses import get_loss
    from prefixpo.modeling import build_attention_masks

    device = next(policy.parameters()).device
    set_mode_attention([policy, reference], mode, settings["backend"])
    compiled = settings["compile_model"] and mode in COMPILED_MODES
    set_compiled([policy, reference], compiled)
    policy.load_state_dict(reference.state_dict())  # every mode starts from the same weights
    policy.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings["lr"], fused=device.type == "cuda")
    loss_fn = get_loss("sigmoid", beta=0.1)
    plans = [[mb.to(device) for mb in layout_step(mode, g, settings["capacity"], settings["micro_pairs"],
                                                   settings["num_buckets"], seed=settings["seed"] + s)]
             for s, g in enumerate(steps)]
    num_pairs = [sum(mb.num_pairs for mb in plan) for plan in plans]
    compiles_before = _unique_graphs()
    t_warm = time.perf_counter()
    warm = []
    for s in range(warmup):
        optimizer.zero_grad(set_to_none=True)
        warm.append([float(x) for x in bench_step(policy, reference, plans[s], loss_fn, num_pairs[s])])
        optimizer.step()
    # every shape the timed steps use, once more than the warm-up steps covered (no update)
    seen = {mb.batch.shape for plan in plans[:warmup] for mb in plan}
    if mode != "separate" or compiled:
        for plan in plans[warmup:]:
            for mb in plan:
                if mb.batch.shape not in seen:
                    seen.add(mb.batch.shape)
                    bench_step(policy, reference, [mb], loss_fn, mb.num_pairs)
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    warmup_s = time.perf_counter() - t_warm
    compiles_warm = _unique_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = range(warmup, len(plans))
    events = ([[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in plans[s]]
               for s in timed] if device.type == "cuda" else [None for _ in timed])
    _sync(device)
    start = time.perf_counter()
    outputs = []
    for s, ev in zip(timed, events):  # no host syncs in here
        optimizer.zero_grad(set_to_none=True)
        outputs.append(bench_step(policy, reference, plans[s], loss_fn, num_pairs[s], ev))
        optimizer.step()
    _sync(device)
    elapsed = time.perf_counter() - start
    recompiles = _unique_graphs() - compiles_warm
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    micro_ms = [_device_ms(ev) for ev in events] if device.type == "cuda" else None
    idle = {}
    if micro_ms:
        for r in settings["ranks"]:
            idle[str(r)] = 100 * sum(rank_idle(ms, [mb.tokens for mb in plans[s]], r, settings["seed"] + s)
                                     for s, ms in zip(timed, micro_ms)) / len(micro_ms)
    # block-mask build time, in a loop of its own so the timed loop stays free of syncs
    mask_s = 0.0
    if mode != "separate":
        for s in timed:
            for mb in plans[s]:
                _sync(device)
                t0 = time.perf_counter()
                build_attention_masks(policy, mb.batch)
                _sync(device)
                mask_s += time.perf_counter() - t0
    del optimizer
    policy.zero_grad(set_to_none=True)
    n_timed = max(len(timed), 1)
    sum_timed = {k: sum(getattr(mb, k) for s in timed for mb in plans[s])
                 for k in ("tokens", "padded_tokens", "attention_pairs", "scored")}
    pairs = sum(num_pairs[s] for s in timed)
    flops = step_flops(settings["dims"], sum_timed["tokens"], sum_timed["attention_pairs"], sum_timed["scored"])
    step_ms = 1e3 * elapsed / n_timed
    peak_flops = settings["peak_flops"]
    return {
        "mode": mode, "compiled": compiled, "pairs_per_step": num_pairs[0], "timed_steps": len(timed),
        "warmup_steps": warmup, "micro_batches_per_step": sum(len(plans[s]) for s in timed) / n_timed,
        "shapes": sorted({"x".join(map(str, mb.batch.shape)) for p in plans for mb in p}),
        "step_ms": round(step_ms, 2), "pairs_per_s": pairs / elapsed,
        "tokens_per_s": sum_timed["tokens"] / elapsed,
        "tokens_per_step": sum_timed["tokens"] / n_timed,
        "padded_tokens_per_step": sum_timed["padded_tokens"] / n_timed,
        "padding_fraction": 1 - sum_timed["tokens"] / max(sum_timed["padded_tokens"], 1),
        "attention_pairs_per_step": sum_timed["attention_pairs"] / n_timed,
        "scored_tokens_per_step": sum_timed["scored"] / n_timed,
        "model_tflops_per_step": flops / n_timed / 1e12,
        "achieved_tflops": flops / elapsed / 1e12,
        "mfu": flops / elapsed / peak_flops if peak_flops else None,
        "peak_gib": peak,
        "forward_backward_pct_of_step": (100 * sum(map(sum, micro_ms)) / 1e3 / elapsed) if micro_ms else None,
        "rank_idle_pct": idle or None,
        "mask_build_ms_per_step": 1e3 * mask_s / n_timed if mode != "separate" else None,
        "mask_build_pct_of_step": 100 * mask_s / elapsed if mode != "separate" else None,
        "recompiles_after_warmup": recompiles, "compiles_in_warmup": compiles_warm - compiles_before,
        "warmup_s": round(warmup_s, 2),
        "losses": [w[0] for w in warm] + [float(o[0]) for o in outputs],
        "policy_logps": [w[1] for w in warm] + [float(o[1]) for o in outputs],
    }


# --- the command ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="all", help="a profile of the profiles file, or 'all' (default)")
    parser.add_argument("--model", default="llama-1b",
                        help="a key of the profiles file's models (default llama-1b) or a config JSON path")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode (default 3)")
    parser.add_argument("--capacity", type=int, default=8192, help="tokens per packed row (default 8192)")
    parser.add_argument("--rows-per-step", type=int, default=4,
                        help="default pairs per step: the groups that fill this many packed rows on average, "
                             "a multiple of --micro-pairs (default 4)")
    parser.add_argument("--pairs-per-step", type=int, default=None, help="pairs per optimizer step (overrides "
                        "--rows-per-step)")
    parser.add_argument("--micro-pairs", type=int, default=4,
                        help="pairs per micro-batch of the unpacked modes (default 4, TRL's batch: docs/benchmarks.md 'The peer')")
    parser.add_argument("--num-buckets", type=int, default=4, help="packed row lengths (default 4)")
    parser.add_argument("--num-examples", type=int, default=512, help="groups sampled per profile (default 512)")
    parser.add_argument("--profiles", default=None,
                        help="a profiles JSON file (default $PREFIXPO_BENCH_PROFILES, else the bench_profiles.json shipped with prefixpo)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--backend", choices=["auto", "flex", "sdpa"], default="auto",
                        help="prefixpo attention of the non-separate modes (auto: flex on cuda, sdpa on cpu)")
    parser.add_argument("--compile-model", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile every decoder layer in the packed modes (default: on for cuda; "
                             "`separate`, TRL's recipe, and unpacked `shared` always run eager)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="data-parallel rank counts for which to report the waiting of the other ranks for "
                             "the slowest, from measured micro-batch times (default 2 4)")
    parser.add_argument("--cudnn-sdpa", action="store_true",
                        help="leave cuDNN SDPA on (off by default: it is slower on changing padded shapes: docs/benchmarks.md 'The peer')")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU (default: 989 dense bf16 on H100/H200 SXM; none elsewhere)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; start no new profile x mode after this (the rest is reported as skipped)")
    parser.add_argument("--json", metavar="OUT", help="write one JSON line per mode (appended as they finish)")
    parser.add_argument("--table-from", metavar="JSONL", help="only print the table of an earlier --json file")
    parser.add_argument("--attention", action="store_true",
                        help="run the attention microbenchmark instead (see prefixpo.bench_attention)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="--attention: total lengths (default 1024 2048 4096 8192 16384)")
    parser.add_argument("--repeats", type=int, default=10, help="--attention: timed repeats (median)")
    parser.add_argument("--plot", default=None, help="--attention: PNG path (default next to --json)")


def _error(message: str) -> int:
    print(f"prefixpo bench: error: {message}", file=sys.stderr)
    return 2


def _fmt(x, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'profile':<16} {'mode':<16} {'pairs/s':>8} {'tok/s':>8} {'pad%':>5} {'MFU%':>5} {'GiB':>6} "
            f"{'mask ms':>7} {'mask%':>5} {'recomp':>6} {'idle%':>5} {'x sep':>6} {'x sep-pk':>8} {'ideal':>6}")
    lines = [head]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['profile']:<16} {r['mode']:<16} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['profile']:<16} {r['mode']:<16} {r['pairs_per_s']:>8.2f} {r['tokens_per_s']:>8.0f} "
            f"{100 * r['padding_fraction']:>5.1f} {_fmt(r['mfu'] and 100 * r['mfu'], 5, 1)} "
            f"{_fmt(r['peak_gib'], 6, 1)} {_fmt(r['mask_build_ms_per_step'], 7, 2)} "
            f"{_fmt(r['mask_build_pct_of_step'], 5, 2)} {r['recompiles_after_warmup']:>6} "
            f"{_fmt(next(iter((r.get('rank_idle_pct') or {}).values()), None), 5, 1)} "
            f"{_fmt(r['vs_separate'], 6, 2)} {_fmt(r['vs_separate_packed'], 8, 2)} "
            f"{r['ideal_token_ratio']:>6.3f}")
    return "\n".join(lines)


def _environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device.type}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run(args: argparse.Namespace) -> int:
    from prefixpo.profiles import load_profiles, sample_groups

    if args.table_from:
        with open(args.table_from) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(format_table([r for r in rows if "mode" in r]))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda asked for, but no CUDA device is available")
    if args.attention:
        from prefixpo.bench_attention import run_attention

        return run_attention(args, device)
    if (args.steps < 1 or args.warmup < 0 or args.micro_pairs < 1 or args.num_examples < 1
            or args.rows_per_step < 1 or min(args.ranks) < 1):
        return _error("--steps, --micro-pairs, --rows-per-step and --ranks must be at least 1, --warmup at least 0")
    if args.capacity < 128 or args.capacity % 128:
        return _error(f"--capacity must be a positive multiple of 128, got {args.capacity}")
    try:
        profiles = load_profiles(args.profiles)
        config = model_config(args.model, profiles)
    except (OSError, ValueError) as err:
        return _error(str(err))
    names = list(profiles["profiles"]) if args.profile == "all" else [args.profile]
    if args.profile != "all" and args.profile not in profiles["profiles"]:
        return _error(f"unknown profile {args.profile!r}; the profiles are: {', '.join(profiles['profiles'])}")
    backend = args.backend if args.backend != "auto" else ("flex" if device.type == "cuda" else "sdpa")
    t_start = time.perf_counter()
    from torch._dynamo import config as dynamo_config

    # many row shapes over many profiles: let compiled flex keep every one of them
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 1024)
    for knob in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 8192)
    if device.type == "cuda" and not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, reference = build_models(config, device, dtype, args.seed)
    compile_model = args.compile_model if args.compile_model is not None else device.type == "cuda"
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak_flops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in PEAKS_BF16.items() if k in name), None)
    dims = model_dims(policy)
    settings = {"backend": backend, "capacity": args.capacity, "micro_pairs": args.micro_pairs,
                "num_buckets": args.num_buckets, "seed": args.seed, "lr": args.lr,
                "compile_model": compile_model, "dims": dims, "peak_flops": peak_flops, "ranks": args.ranks}
    env = _environment(device)
    print(json.dumps({"env": env, "model": args.model, "dims": dims, "backend": backend,
                      "peak_tflops": peak_flops and peak_flops / 1e12, "args": {
                          k: v for k, v in vars(args).items() if not k.startswith("_")}}), flush=True)
    out = open(args.json, "a") if args.json else None
    rows = []
    try:
        for name in names:
            groups = sample_groups(profiles, name, dims["vocab"], num_examples=args.num_examples, seed=args.seed)
            groups = [fit_both_layouts(g, args.capacity) for g in groups]
            per_step = args.pairs_per_step or default_pairs_per_step(groups, args.rows_per_step * args.capacity,
                                                                     args.micro_pairs)
            needed = per_step * (args.warmup + args.steps)
            if needed > len(groups):
                more = sample_groups(profiles, name, dims["vocab"], num_examples=needed, seed=args.seed)
                groups = [fit_both_layouts(g, args.capacity) for g in more]
            steps = [groups[s * per_step:(s + 1) * per_step] for s in range(args.warmup + args.steps)]
            used = [g for s in steps for g in s]
            ideal = sum(g.num_separate_tokens for g in used) / sum(g.num_tokens for g in used)
            by_mode: dict[str, dict] = {}
            for mode in args.modes:
                row = {"profile": name, "model": args.model}
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    row.update(mode=mode, skipped=f"time budget of {args.time_budget:.0f} s spent")
                else:
                    row.update(run_mode(mode, policy, reference, steps, args.warmup, settings))
                    by_mode[mode] = row
                    for base, key in (("separate", "vs_separate"), ("separate-packed", "vs_separate_packed")):
                        row[key] = row["pairs_per_s"] / by_mode[base]["pairs_per_s"] if base in by_mode else None
                    row["ideal_token_ratio"] = ideal
                    row.update(env=env, backend=backend if mode != "separate" else "transformers-sdpa",
                               dtype=str(dtype).removeprefix("torch."), capacity=args.capacity,
                               micro_pairs=args.micro_pairs, peak_tflops=peak_flops and peak_flops / 1e12)
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if out:
            out.close()
    print()
    print(format_table(rows))
    if peak_flops:
        print(f"MFU over {peak_flops / 1e12:.0f} TFLOP/s dense bf16; tokens exclude padding; "
              f"ideal = separate-sequence tokens / shared tokens of the sampled pairs; idle% = waiting "
              f"of the other ranks for the slowest at {args.ranks[0]} data-parallel ranks")
    return 0 if all(not math.isnan(x) for r in rows for x in r.get("losses", [])) else 1
