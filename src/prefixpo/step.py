"""One optimizer step's loss, normalised so packing cannot change it (docs/design.md section 4).

A preference loss is the mean over **all pairs of the step**: across micro-batches, packed rows
and data-parallel ranks. Before the first backward the step counts its pairs on every rank and
sums them across ranks (N). Each micro-batch then backpropagates ``sum(its pair losses) * W / N``,
where W is the world size, because data-parallel engines average gradients over ranks. The
gradient is then that of ``mean over the step's N pairs``, whatever the packing, the micro-batch
size, the accumulation or the number of ranks. SFT does the same over target tokens.

The backward of each micro-batch goes through ``backward`` (default ``Tensor.backward``). An
engine that runs backward itself passes its own, which must not scale the loss again: DeepSpeed's
``engine.backward`` divides by its gradient accumulation steps unless told not to
(``prefixpo.engine.deepspeed.engine_backward``).

With ``backward=None`` a step runs forward only (evaluation): nothing is scaled or reduced, and
the result holds this rank's sums and counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from prefixpo.layout import Batch
from prefixpo.logprobs import DEFAULT_CHUNK_SIZE, ResponseLogps
from prefixpo.modeling import build_attention_masks, compute_logps
from prefixpo.pairs import BatchPairs, PairConfig, batch_pair_indices
from prefixpo.reference import ReferenceFn


def global_sum(value: float, device: torch.device | str = "cpu") -> float:
    """``value`` summed over data-parallel ranks (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepResult:
    """One step's results, kept on the device until read, so the step itself never waits for the GPU.

    ``loss``: this rank's share of the step mean (summing over ranks gives the step mean);
    ``count``: the step's pairs (or target tokens for SFT) over all ranks; ``metrics``: sums over
    this rank's pairs of each per-pair metric (divide the global sum by ``count``). Reading
    ``loss`` or ``metrics`` synchronises; ``loss_tensor`` does not."""

    def __init__(self, loss_sum: torch.Tensor, count: float,
                 metric_sums: dict[str, torch.Tensor] | None = None) -> None:
        self.loss_sum = loss_sum
        self.count = count
        self.metric_sums = metric_sums or {}

    @property
    def loss_tensor(self) -> torch.Tensor:
        return self.loss_sum / self.count

    @property
    def loss(self) -> float:
        return self.loss_sum.item() / self.count

    @property
    def metrics(self) -> dict[str, float]:
        if not self.metric_sums:
            return {}
        values = torch.stack([v.float() for v in self.metric_sums.values()]).tolist()  # one sync
        return dict(zip(self.metric_sums, values))


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
# no_sync(is_last_micro_batch) -> context; data-parallel engines skip the gradient all-reduce inside
SyncContext = Callable[[bool], AbstractContextManager]
# backward(loss): backpropagates a micro-batch's share of the step loss as given, with no further scaling
Backward = Callable[[torch.Tensor], object]


def _no_sync_context(no_sync: SyncContext | None, index: int, count: int) -> AbstractContextManager:
    return no_sync(index == count - 1) if no_sync is not None else nullcontext()


def activation_offload(enabled: bool, device: torch.device) -> AbstractContextManager:
    """TRL's ``activation_offloading``: around a step's forwards and backwards, the tensors autograd
    saves for the backward are kept in CPU memory (pinned on CUDA) and copied back when the backward
    needs them (``torch.autograd.graph.save_on_cpu``); the results are the same, bit for bit."""
    if not enabled:
        return nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def _ld_sums(logps: ResponseLogps, side: torch.Tensor, other: torch.Tensor, ld_alpha: float,
             what: str) -> torch.Tensor:
    """LD-DPO log-probs of responses ``side`` paired with ``other`` ``[num_pairs]``: the sum of the
    first ``min(len_side, len_other)`` token log-probs plus ``ld_alpha`` times the sum of the rest.
    A response's scored tokens are contiguous and in order in ``token_logps``, packed or not."""
    counts = logps.counts
    if logps.token_logps.numel() != int(counts.sum()):
        raise ValueError(f"ld_alpha needs the {what}'s per-token log-probs; a precomputed reference keeps only "
                         "sums (use reference_mode: model)")
    starts = torch.cumsum(counts, 0) - counts
    # prefix sums in fp64: a packed row's running sum grows with its tokens; its differences must stay exact
    cum = torch.cat([logps.token_logps.new_zeros(1, dtype=torch.float64), logps.token_logps.double().cumsum(0)])
    shared = torch.minimum(counts[side], counts[other])
    head = (cum[starts[side] + shared] - cum[starts[side]]).to(logps.sums.dtype)
    return head + ld_alpha * (logps.sums[side] - head)


def wpo_weights(logps: ResponseLogps) -> torch.Tensor:
    """WPO weights ``[R]`` (Zhou et al. 2024, arXiv:2406.11827, eq. 2): ``exp`` of the mean over a
    response's tokens of ``log p(token) - log sum_v p(v)^2`` (detached); needs ``token_log_sum_sq``."""
    if logps.token_log_sum_sq is None:
        raise ValueError("use_weighting needs per-token log sum_v p(v)^2 (compute_logps(..., log_sum_sq=True))")
    aligned = (logps.token_logps.detach() - logps.token_log_sum_sq).double()
    response = torch.repeat_interleave(torch.arange(logps.counts.numel(), device=aligned.device), logps.counts)
    sums = torch.zeros(logps.counts.numel(), dtype=torch.float64, device=aligned.device).index_add(0, response, aligned)
    return torch.exp(sums / logps.counts).to(logps.sums.dtype)


def pair_losses(logps: ResponseLogps, reference: ResponseLogps | None, pairs: BatchPairs,
                loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn`` over a batch's pairs: per-pair losses ``[num_pairs]`` and metrics (a listwise loss:
    per ranked group, ``pairs`` then holding one entry per group).

    The options a ``get_loss`` function carries are applied here: ``ld_alpha`` (per-pair LD-DPO
    sums from the token log-probs) and ``use_weighting`` (WPO ``pair_weights``)."""
    if getattr(loss_fn, "listwise", False):  # one loss per ranked group; pairs holds one entry per group
        if pairs.rankings is None:
            raise ValueError("the listwise loss needs rankings: set pair_strategy: ranking")
        return loss_fn(logps.sums, reference.sums if reference is not None else None, pairs.rankings)
    c = pairs.chosen_idx.to(logps.sums.device, non_blocking=True)
    r = pairs.rejected_idx.to(logps.sums.device, non_blocking=True)
    ld_alpha = getattr(loss_fn, "ld_alpha", None)

    def sides(x: ResponseLogps, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if ld_alpha is None:
            return x.sums[c], x.sums[r]
        return _ld_sums(x, c, r, ld_alpha, what), _ld_sums(x, r, c, ld_alpha, what)

    pc, pr = sides(logps, "policy")
    rc, rr = sides(reference, "reference") if reference is not None else (None, None)
    extra = {} if ld_alpha is None else {"nll_chosen_logps": logps.sums[c]}  # NLL terms: plain sums (TRL)
    if getattr(loss_fn, "use_weighting", False):
        w = wpo_weights(logps)
        extra["pair_weights"] = w[c] * w[r]
    return loss_fn(pc, pr, rc, rr, logps.counts[c], logps.counts[r], **extra)


def preference_step(policy: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                    reference: ReferenceFn | None = None, pair_config: PairConfig | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, no_sync: SyncContext | None = None,
                    pairs: Sequence[BatchPairs] | None = None, num_pairs: float | None = None,
                    backward: Backward | None = torch.Tensor.backward,
                    masks: Sequence[object] | None = None) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step (no optimizer update).

    The step queues its work without waiting for the device: pass ``pairs`` (``batch_pair_indices``
    of each micro-batch, computed while the batch was still on the host) to avoid the one device
    read that finding them on a device batch costs. ``num_pairs``: the step's pairs over all ranks
    and calls, when the caller knows it (a step split over several calls); otherwise the pairs of
    ``micro_batches`` summed over ranks, one all-reduce in data-parallel runs. ``backward``: run on
    each micro-batch's scaled loss (an engine's own backward; see the module docstring), or None for
    a forward only. ``masks``: each micro-batch's attention masks, where the caller built them
    already (``reference_for_step``); otherwise each is built here, once for the policy and the
    reference."""
    device = next(policy.parameters()).device
    if pairs is None:
        pairs = [batch_pair_indices(mb, pair_config) for mb in micro_batches]
    elif len(pairs) != len(micro_batches):
        raise ValueError(f"{len(pairs)} pair sets for {len(micro_batches)} micro-batches")
    total = _step_count(sum(p.num_pairs for p in pairs), num_pairs, backward, device, "preference pair")
    scale = world_size() / max(total, 1)
    loss_sum = torch.zeros((), device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, (mb, pr) in enumerate(zip(micro_batches, pairs)):
        with _no_sync_context(no_sync, i, len(micro_batches)):
            mask = masks[i] if masks is not None else build_attention_masks(policy, mb)  # policy and reference
            logps = compute_logps(policy, mb, mask, chunk_size, log_sum_sq=getattr(loss_fn, "use_weighting", False))
            if pr.num_pairs == 0:  # an empty row: still run backward, so data-parallel ranks stay in step
                if backward is not None:
                    backward(logps.token_logps.sum() * 0.0)
                continue
            ref = reference(mb, mask) if reference is not None else None
            losses, metrics = pair_losses(logps, ref, pr, loss_fn)
            loss = losses.sum()
            if backward is not None:
                backward(loss * scale)
        loss_sum += loss.detach()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float().sum()
    return StepResult(loss_sum, total, metric_sums)


def _step_count(local: float, known: float | None, backward: Backward | None, device: torch.device,
                what: str) -> float:
    """What a step's loss is the mean over: ``known``, else ``local`` summed over ranks; a forward
    only (``backward`` None) counts this rank's alone, and may have none."""
    if backward is None:
        return local
    total = known if known is not None else global_sum(local, device)
    if total == 0:
        raise ValueError(f"the optimizer step has no {what} on any rank")
    return total


def sft_step(policy: nn.Module, micro_batches: Sequence[Batch], chunk_size: int = DEFAULT_CHUNK_SIZE,
             no_sync: SyncContext | None = None,
             backward: Backward | None = torch.Tensor.backward) -> StepResult:
    """SFT: the mean negative log-likelihood over all target tokens of the step (``backward`` as in
    ``preference_step``)."""
    device = next(policy.parameters()).device
    total = _step_count(sum(int(mb.scored_targets.numel()) for mb in micro_batches), None, backward, device,
                        "target token")
    scale = world_size() / max(total, 1)
    loss_sum = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        with _no_sync_context(no_sync, i, len(micro_batches)):
            logps = compute_logps(policy, mb, chunk_size=chunk_size)
            loss = -logps.token_logps.sum()
            if backward is not None:
                backward(loss * scale)
        loss_sum += loss.detach()
    return StepResult(loss_sum, total)
