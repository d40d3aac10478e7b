"""Groups with more than two responses: pairs from scores, and the Plackett-Luce listwise DPO loss.

A batch numbers its responses group by group, in response order within a group, and
``response_group [R]`` gives each response's group (docs/design.md sections 1 and 4)::

    scores          = [[3.0, 1.0, 2.0], [5.0, 5.0]]     two groups: 3 and 2 responses
    response_group  = [0, 0, 0, 1, 1]                   flat numbering 0..4
    batch_pairs(scores, response_group, "all")
        -> chosen_idx [0, 0, 2], rejected_idx [1, 2, 1]; group 1 is a tie: skipped, reported

The caller then scores ``policy_logps[chosen_idx]`` against ``policy_logps[rejected_idx]`` with any
pairwise loss of ``prefixpo.losses``; every pair counts once in the step's mean over pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prefixpo.layout import Batch

logger = logging.getLogger(__name__)

PAIR_STRATEGIES = ("all", "best_vs_each", "best_vs_worst", "ranking")
Scores = Sequence[Sequence[float]] | Tensor


@dataclass(frozen=True)
class PairConfig:
    """How pairs are formed inside a group.

    ``strategy``: ``all`` (every pair i, j with s_i > s_j), ``best_vs_each`` (the best response
    against every other), ``best_vs_worst`` (one pair per group) or ``ranking`` (for the ``listwise``
    loss: one entry per group, best vs worst, plus the group's full ranking in
    ``BatchPairs.rankings``; ``min_gap`` still decides whether best vs worst makes a group). ``min_gap``: a pair is kept
    only if ``s_chosen - s_rejected >= min_gap`` and ``> 0`` (a tie never makes a pair).
    """

    strategy: str = "all"
    min_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in PAIR_STRATEGIES:
            raise ValueError(f"unknown pair strategy {self.strategy!r}; choose one of {', '.join(PAIR_STRATEGIES)}")
        if not self.min_gap >= 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap!r}")


def group_pairs(scores: Sequence[float], strategy: str = "all", min_gap: float = 0.0) -> list[tuple[int, int]]:
    """Within-group ``(chosen_index, rejected_index)`` pairs from the responses' scores.

    The best (worst) response is the first one with the highest (lowest) score. A pair is kept iff
    its gap is > 0 and >= ``min_gap``; so a tie is never a pair and a group may yield no pair::

        group_pairs([3, 1, 2], "all")            -> [(0, 1), (0, 2), (2, 1)]
        group_pairs([3, 1, 2], "all", 1.5)       -> [(0, 1)]
        group_pairs([3, 1, 2], "best_vs_each")   -> [(0, 1), (0, 2)]
        group_pairs([3, 3, 1], "best_vs_each")   -> [(0, 2)]        (0 vs 1 is a tie)
        group_pairs([3, 1, 2], "best_vs_worst")  -> [(0, 1)]
        group_pairs([2, 2], "best_vs_worst")     -> []
    """
    config = PairConfig(strategy, min_gap)
    s = [float(x) for x in scores]
    if any(x != x for x in s):
        raise ValueError(f"scores contain NaN: {s}")

    def keep(i: int, j: int) -> bool:
        gap = s[i] - s[j]
        return gap > 0 and gap >= config.min_gap

    if len(s) < 2:
        return []
    best = max(range(len(s)), key=lambda i: (s[i], -i))
    if config.strategy == "all":
        return [(i, j) for i in range(len(s)) for j in range(len(s)) if keep(i, j)]
    if config.strategy == "best_vs_each":
        return [(best, j) for j in range(len(s)) if j != best and keep(best, j)]
    worst = min(range(len(s)), key=lambda i: (s[i], i))
    return [(best, worst)] if keep(best, worst) else []  # best_vs_worst, ranking


@dataclass
class BatchPairs:
    """Pairs over a batch's flat response numbering.

    ``chosen_idx``, ``rejected_idx``, ``pair_group``: LongTensor ``[num_pairs]`` (response indices
    into ``[R]`` and each pair's group). ``skipped_groups``: groups that gave no pair (ties, gaps
    below ``min_gap``, a single response); the caller should log ``num_skipped``. ``rankings``
    (strategy ``ranking`` only): per entry, its group's flat response indices best-first.
    """

    chosen_idx: Tensor
    rejected_idx: Tensor
    pair_group: Tensor
    skipped_groups: list[int]
    rankings: list[Tensor] | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_idx.numel())

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_groups)


def _group_offsets(response_group: Tensor, sizes: Sequence[int] | None = None) -> list[int]:
    """First flat response index of each group; checks the group-by-group numbering."""
    rg = response_group
    if not isinstance(rg, Tensor) or rg.dim() != 1 or rg.dtype not in (torch.int32, torch.int64):
        raise ValueError("response_group must be an integer tensor [R]")
    counts = torch.bincount(rg, minlength=len(sizes) if sizes is not None else 0) if rg.numel() else rg.new_zeros(0)
    if rg.numel() and (bool((rg[1:] < rg[:-1]).any()) or int(rg[0]) != 0 or bool((counts == 0).any())):
        raise ValueError("response_group must number groups 0, 1, ... in order, each group's responses contiguous")
    if sizes is not None:
        if len(counts) != len(sizes) or any(int(c) != n for c, n in zip(counts, sizes, strict=True)):
            raise ValueError(
                f"scores give {list(sizes)} responses per group but response_group gives {counts.tolist()}"
            )
    return [0] + torch.cumsum(counts, 0).tolist()[:-1]


def _split_scores(scores: Scores, response_group: Tensor) -> list[list[float]]:
    if isinstance(scores, Tensor):
        if scores.shape != response_group.shape:
            raise ValueError(f"flat scores have shape {tuple(scores.shape)}, response_group {tuple(response_group.shape)}")
        offsets = _group_offsets(response_group)
        ends = offsets[1:] + [len(scores)]
        return [scores[a:b].tolist() for a, b in zip(offsets, ends, strict=True)]
    return [list(map(float, s)) for s in scores]


def batch_pairs(
    scores: Scores, response_group: Tensor, strategy: str = "all", min_gap: float = 0.0, on_no_pair: str = "skip"
) -> BatchPairs:
    """Pairs for a batch: ``policy_logps[chosen_idx]`` vs ``policy_logps[rejected_idx]``.

    ``scores``: one sequence of scores per group, or a flat tensor ``[R]`` aligned with
    ``response_group [R]``. A group without a valid pair is skipped and listed in
    ``skipped_groups`` (``on_no_pair="skip"``, logged at INFO) or raises (``on_no_pair="error"``).
    Example: scores ``[[3, 1, 2], [5, 5]]``, response_group ``[0, 0, 0, 1, 1]``, ``all`` ->
    chosen_idx ``[0, 0, 2]``, rejected_idx ``[1, 2, 1]``, skipped_groups ``[1]``.
    """
    if on_no_pair not in ("skip", "error"):
        raise ValueError(f"on_no_pair must be 'skip' or 'error', got {on_no_pair!r}")
    per_group = _split_scores(scores, response_group)
    offsets = _group_offsets(response_group, [len(s) for s in per_group])
    chosen: list[int] = []
    rejected: list[int] = []
    group: list[int] = []
    skipped: list[int] = []
    rankings: list[Tensor] = []
    for g, (s, offset) in enumerate(zip(per_group, offsets, strict=True)):
        pairs = group_pairs(s, strategy, min_gap)
        if pairs and strategy == "ranking":
            order = torch.sort(torch.tensor(s, dtype=torch.float64), descending=True, stable=True).indices
            rankings.append((order + offset).to(response_group.device))
        if not pairs:
            if on_no_pair == "error":
                raise ValueError(f"group {g} with scores {s} has no pair with a gap > 0 and >= {min_gap}")
            skipped.append(g)
        for i, j in pairs:
            chosen.append(offset + i)
            rejected.append(offset + j)
            group.append(g)
    if skipped:
        logger.info("pairs: %d of %d groups gave no pair and were skipped: %s", len(skipped), len(per_group), skipped)
    device = response_group.device

    def as_long(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return BatchPairs(as_long(chosen), as_long(rejected), as_long(group), skipped,
                      rankings if strategy == "ranking" else None)


def rank_groups(scores: Scores, response_group: Tensor) -> tuple[list[Tensor], list[int]]:
    """Per group, the flat response indices ordered best-first by score, for ``listwise_dpo_loss``.

    Ties keep response order (a stable sort): Plackett-Luce then treats the earlier response as
    better. Groups with one response are skipped and returned as the second value.
    Example: scores ``[[1, 3, 2], [4]]``, response_group ``[0, 0, 0, 1]`` -> ``([tensor([1, 2, 0])], [1])``.
    """
    per_group = _split_scores(scores, response_group)
    offsets = _group_offsets(response_group, [len(s) for s in per_group])
    rankings: list[Tensor] = []
    skipped: list[int] = []
    for g, (s, offset) in enumerate(zip(per_group, offsets, strict=True)):
        if len(s) < 2:
            skipped.append(g)
            continue
        order = torch.sort(torch.tensor(s, dtype=torch.float64), descending=True, stable=True).indices
        rankings.append((order + offset).to(response_group.device))
    return rankings, skipped


def listwise_dpo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    rankings: Sequence[Tensor | Sequence[int]],
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plackett-Luce DPO over ranked groups (Rafailov et al. 2023, arXiv:2305.18290, Appendix A.3).

    ``policy_logps``, ``reference_logps``: summed log-probs ``[R]``. ``rankings``: per group, the flat
    indices of its responses best-first (sizes may differ, each >= 2). With ``r = beta (pi - ref)``
    and a group ranked ``y_1 > ... > y_K``::

        loss = -sum_k log( exp(r_k) / sum_{j >= k} exp(r_j) )

    For K = 2 this is ``-logsigmoid(r_1 - r_2)``, the DPO ``sigmoid`` loss. Returns per-group losses
    ``[num_groups]`` and detached per-group metrics: ``rewards/chosen`` (best), ``rewards/rejected``
    (worst), ``rewards/margins``, ``rewards/accuracies`` (share of ordered pairs of the ranking whose
    rewards agree with it), ``logps/chosen``, ``logps/rejected``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if policy_logps.dim() != 1 or policy_logps.shape != reference_logps.shape:
        raise ValueError("policy_logps and reference_logps must be 1-D tensors [R] of the same shape")
    index, valid = _ranking_index(rankings, policy_logps.numel())
    index, valid = index.to(policy_logps.device), valid.to(policy_logps.device)
    rewards = beta * (policy_logps - reference_logps)
    r = rewards[index]  # [G, K]; padding holds response 0's reward and is masked out
    width = r.shape[1]
    k = torch.arange(width, device=r.device)
    # suffix[g, k, j]: j is in the remaining set {k, ..., n_g - 1}; the diagonal keeps padded rows finite
    suffix = (k[None, None, :] >= k[None, :, None]) & (valid[:, None, :] | torch.eye(width, dtype=torch.bool, device=r.device))
    denom = torch.logsumexp(r[:, None, :].masked_fill(~suffix, float("-inf")), dim=-1)  # [G, K]
    losses = -torch.where(valid, r - denom, torch.zeros_like(r)).sum(dim=1)
    return losses, _listwise_metrics(policy_logps.detach(), rewards.detach(), index, valid)


def _ranking_index(rankings: Sequence[Tensor | Sequence[int]], num_responses: int) -> tuple[Tensor, Tensor]:
    """``(index, valid)``, both ``[num_groups, longest ranking]`` on the CPU: each group's response
    indices best-first, padded with 0, and where they are real.

    >>> _ranking_index([[2, 0, 1], [3, 4]], 5)
    (tensor([[2, 0, 1],
            [3, 4, 0]]), tensor([[ True,  True,  True],
            [ True,  True, False]]))
    """
    sizes = [len(r) for r in rankings]
    if not sizes:
        raise ValueError("rankings is empty")
    index = torch.zeros(len(sizes), max(sizes), dtype=torch.long)
    valid = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for g, ranking in enumerate(rankings):
        idx = torch.as_tensor(ranking, dtype=torch.long).cpu()
        if idx.numel() < 2 or idx.unique().numel() != idx.numel():
            raise ValueError(f"rankings[{g}] must hold >= 2 distinct response indices, got {idx.tolist()}")
        if bool((idx < 0).any()) or bool((idx >= num_responses).any()):
            raise ValueError(f"rankings[{g}] has indices outside [0, {num_responses}): {idx.tolist()}")
        index[g, : len(idx)] = idx
        valid[g, : len(idx)] = True
    return index, valid


def _listwise_metrics(logps: Tensor, rewards: Tensor, index: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Per-group metrics of ``listwise_dpo_loss`` from detached ``[R]`` log-probs and rewards: best
    against worst response, and the share of the ranking's ordered pairs whose rewards agree."""
    last = index.gather(1, (valid.sum(1) - 1)[:, None]).squeeze(1)
    r = rewards[index]
    k = torch.arange(index.shape[1], device=index.device)
    before = k[None, :, None] < k[None, None, :]
    both = valid[:, :, None] & valid[:, None, :] & before
    agree = (r[:, :, None] > r[:, None, :]) & both
    chosen_r, rejected_r = rewards[index[:, 0]], rewards[last]
    return {
        "rewards/chosen": chosen_r,
        "rewards/rejected": rejected_r,
        "rewards/margins": chosen_r - rejected_r,
        "rewards/accuracies": agree.sum((1, 2)).to(r.dtype) / both.sum((1, 2)).to(r.dtype),
        "logps/chosen": logps[index[:, 0]],
        "logps/rejected": logps[last],
    }


def batch_pair_indices(batch: Batch, pair_config: PairConfig | None = None) -> BatchPairs:
    """Pairs of a batch. A group with its own pairs (``Group.pairs``, e.g. rows merged by prompt)
    gives exactly those; a group with scores gives pairs by ``pair_config``; a group without either
    is a (chosen, rejected) pair: response 0 preferred to response 1. Pairs come group by group."""
    if batch.num_groups == 0:  # an empty padding row
        empty = torch.zeros(0, dtype=torch.long)
        return BatchPairs(empty, empty, empty, [])
    response_group = batch.response_group.cpu()  # small index work: on the host, whatever the batch's device
    sizes = torch.bincount(response_group, minlength=batch.num_groups)
    scores = batch.response_scores.cpu() if batch.response_scores is not None else None
    if scores is None:
        scores = torch.full((int(sizes.sum()),), float("nan"))
    explicit = batch.explicit_pairs.cpu() if batch.explicit_pairs is not None else torch.zeros(0, 3, dtype=torch.long)
    has_own = torch.zeros(batch.num_groups, dtype=torch.bool)
    has_own[explicit[:, 2]] = True
    first = torch.cat([torch.ones(1, dtype=torch.bool), response_group[1:] != response_group[:-1]])
    # a group with its own pairs gets placeholder scores (first response best); their pairs are dropped below
    scores = torch.where(has_own[response_group], first.to(scores.dtype), scores)
    unscored = torch.isnan(scores)
    if bool(unscored.any()):
        group_unscored = torch.zeros(batch.num_groups, dtype=torch.bool).index_fill_(
            0, response_group[unscored], True)
        bad = (group_unscored & (sizes != 2)).nonzero()
        if len(bad):
            g = int(bad[0])
            raise ValueError(f"group {g} of the batch has {int(sizes[g])} responses and no scores; groups "
                             "without scores must be (chosen, rejected) pairs")
        scores = torch.where(unscored, first.float(), scores)  # chosen 1, rejected 0
    config = pair_config or PairConfig()
    scored = batch_pairs(scores, response_group, config.strategy, config.min_gap)
    if not len(explicit):
        return scored
    keep = ~has_own[scored.pair_group]
    chosen = torch.cat([scored.chosen_idx[keep], explicit[:, 0]])
    rejected = torch.cat([scored.rejected_idx[keep], explicit[:, 1]])
    group = torch.cat([scored.pair_group[keep], explicit[:, 2]])
    order = torch.sort(group, stable=True).indices
    return BatchPairs(chosen[order], rejected[order], group[order], scored.skipped_groups)
