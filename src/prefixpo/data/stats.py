"""Length statistics of tokenized groups, the saving from prefix sharing, and a packing capacity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefixpo.layout import Group, round_up

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
            f"packing capacity     {self.suggested_capacity} (suggested: largest group, rounded up to 128)",
        ])


def group_stats(prompt_lengths: Sequence[int], response_lengths: Sequence[Sequence[int]]) -> GroupStats:
    """Statistics from the lengths of each group's prompt and responses.

    >>> s = group_stats([4, 10], [[3, 2], [5, 5]])
    >>> s.num_tokens, s.num_separate_tokens, s.suggested_capacity
    (29, 43, 128)
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
    return GroupStats(
        groups=len(p), responses=int(n.sum()),
        prompt_percentiles={q: int(np.percentile(p, q, method="higher")) for q in PERCENTILES},
        response_percentiles={q: int(np.percentile(flat, q, method="higher")) for q in PERCENTILES},
        median_prompt_to_completion=ratio, num_tokens=num_tokens, num_separate_tokens=separate,
        sharing_saving=separate / num_tokens, suggested_capacity=round_up(int((p + sums).max()), 128))


def stats_of(groups: Sequence[Group]) -> GroupStats:
    """``group_stats`` of ``Group``s, or of ``TokenizedGroups`` (read from its length columns)."""
    dataset = getattr(groups, "dataset", None)
    if dataset is not None:
        cols = dataset.select_columns(["prompt_length", "response_lengths"]).to_dict()
        return group_stats(cols["prompt_length"], cols["response_lengths"])
    return group_stats([len(g.prompt_ids) for g in groups], [[len(r) for r in g.response_ids] for g in groups])
