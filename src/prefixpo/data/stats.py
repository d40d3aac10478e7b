"""Length statistics of tokenized groups, the saving from prefix sharing, and a packing capacity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefixpo.layout import Group, round_up
from prefixpo.packing import pack

PERCENTILES = (50, 90, 99, 100)


@dataclass(frozen=True)
class GroupStats:
    """``sharing_saving`` is ``sum(num_separate_tokens) / sum(num_tokens)`` over all groups."""

    groups: int
    responses: int
    prompt_percentiles: dict[int, int]
    response_percentiles: dict[int, int]
    median_prompt_to_completion: float
    num_tokens: int
    num_separate_tokens: int
    sharing_saving: float
    suggested_capacity: int
    fill_ratio: float  # real tokens / (rows x capacity) when packed at suggested_capacity
    groups_per_row: float

    def table(self) -> str:
        def pct(p: dict[int, int]) -> str:
            return "  ".join(f"p{k}={v}" if k < 100 else f"max={v}" for k, v in p.items())
        return "\n".join([
            f"groups               {self.groups} ({self.responses} responses)",
            f"prompt tokens        {pct(self.prompt_percentiles)}",
            f"response tokens      {pct(self.response_percentiles)}",
            f"prompt/completion    median {self.median_prompt_to_completion:.2f}",
            f"tokens shared        {self.num_tokens} (separate sequences: {self.num_separate_tokens})",
            f"sharing saving       {self.sharing_saving:.2f}x fewer tokens",
            f"packing capacity     {self.suggested_capacity} (suggested: the largest group, at least 4096, "
            "a multiple of 128)",
            f"packing at it        fill {self.fill_ratio:.1%}, {self.groups_per_row:.1f} groups per row",
        ])


def group_stats(prompt_lengths: Sequence[int], response_lengths: Sequence[Sequence[int]]) -> GroupStats:
    """Statistics from the lengths of each group's prompt and responses.

    >>> s = group_stats([4, 10], [[3, 2], [5, 5]])
    >>> s.num_tokens, s.num_separate_tokens, s.suggested_capacity, s.groups_per_row
    (29, 43, 4096, 2.0)
    >>> round(s.sharing_saving, 3), s.median_prompt_to_completion
    (1.483, 1.8)
    """
    if not prompt_lengths:
        raise ValueError("no groups to describe")
    p = np.asarray(prompt_lengths, dtype=np.int64)
    n = np.array([len(r) for r in response_lengths], dtype=np.int64)
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in response_lengths])
    sums = np.array([sum(r) for r in response_lengths], dtype=np.int64)
    num_tokens = int(p.sum() + sums.sum())
    separate = int((p * n).sum() + sums.sum())
    ratio = float(np.median(p / (sums / np.maximum(n, 1))))
    # rows of at least 4096 tokens keep the GPU busy; a longer group needs a longer row
    capacity = max(round_up(int((p + sums).max()), 128), 4096)
    rows = pack((p + sums).tolist(), capacity, seed=0)
    return GroupStats(
        groups=len(p), responses=int(n.sum()),
        prompt_percentiles={q: int(np.percentile(p, q, method="higher")) for q in PERCENTILES},
        response_percentiles={q: int(np.percentile(flat, q, method="higher")) for q in PERCENTILES},
        median_prompt_to_completion=ratio, num_tokens=num_tokens, num_separate_tokens=separate,
        sharing_saving=separate / num_tokens, suggested_capacity=capacity,
        fill_ratio=num_tokens / (len(rows) * capacity), groups_per_row=len(p) / len(rows))


def stats_of(groups: Sequence[Group]) -> GroupStats:
    """``group_stats`` of ``Group``s, or of ``TokenizedGroups`` (read from its length columns)."""
    dataset = getattr(groups, "dataset", None)
    if dataset is not None:
        cols = dataset.select_columns(["prompt_length", "response_lengths"]).to_dict()
        return group_stats(cols["prompt_length"], cols["response_lengths"])
    return group_stats([len(g.prompt_ids) for g in groups], [[len(r) for r in g.response_ids] for g in groups])
