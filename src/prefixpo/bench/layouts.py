"""A step's pairs as micro-batches, and what each layout costs in tokens and attention pairs.

Every step draws its groups (one prompt, a chosen and a rejected response) first; each mode lays
the same pairs out its own way (docs/benchmarks.md)::

    separate         TRL's DPO: chosen and rejected rows stacked, right-padded (``baseline``)
    separate-packed  every prompt+response its own single-response group, packed (document mask)
    shared           prefix sharing, one group per row, rows padded to a bucket (multiple of 128)
    shared-packed    prefix sharing and packing into rows of ``capacity`` tokens, bucketed

The prefixpo modes build their batches with ``packing.batch_rows``, the library's one way from
groups to a batch; ``harness.layout_step`` picks the mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prefixpo.layout import Batch, Group
from prefixpo.metrics import attention_pairs
from prefixpo.packing import batch_rows, bucket_lengths, fit_group, pack
from prefixpo.pairs import BatchPairs

MODES = ("separate", "separate-packed", "shared", "shared-packed")


class RowBatch(Protocol):
    """What the harness needs of a mode's batch: a ``layout.Batch`` or a ``baseline.SeparateBatch``."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def to(self, device: Any, non_blocking: bool = False) -> RowBatch: ...


@dataclass
class MicroBatch:
    """One micro-batch of a mode and its pairs. ``chosen_idx``/``rejected_idx`` index the
    per-response (per-row for separate) log-probs; ``chosen_len``/``rejected_len`` are the
    responses' scored tokens. ``tokens``: real tokens; ``padded_tokens``: rows x T;
    ``attention_pairs``: allowed (q, k) pairs of the real tokens; ``scored``: scored tokens."""

    batch: RowBatch
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

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(self.batch.to(device), *(t.to(device) for t in (self.chosen_idx, self.rejected_idx,
                                                                            self.chosen_len, self.rejected_len)),
                          self.tokens, self.padded_tokens, self.attention_pairs, self.scored)

    def pairs(self) -> BatchPairs:
        return BatchPairs(self.chosen_idx, self.rejected_idx, torch.arange(self.num_pairs), [])


# --- what a layout costs -----------------------------------------------------------------------

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


# --- the prefixpo modes --------------------------------------------------------------------------

def pair_micro_batch(batch: Batch, groups: Sequence[Group], separate: bool) -> MicroBatch:
    """A batch whose responses come as (chosen, rejected) in order, one pair per entry of
    ``groups``; ``separate``: the pairs are laid out as separate sequences (for the attention
    count)."""
    n = len(groups)
    chosen, rejected = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    lengths = batch.response_lengths
    return MicroBatch(batch, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long),
                      lengths[chosen], lengths[rejected], int((batch.document_ids >= 0).sum()),
                      batch.input_ids.numel(),
                      sum(attention_pairs(g, shared=not separate) for g in groups),
                      int(batch.scored_targets.numel()))


def shared_micro_batches(groups: Sequence[Group], micro_pairs: int) -> list[MicroBatch]:
    """``shared``: ``micro_pairs`` groups per micro-batch, one per row, rows padded to the
    smallest of ``shared_row_buckets`` that holds the longest."""
    out = []
    for i in range(0, len(groups), micro_pairs):
        chunk = groups[i:i + micro_pairs]
        longest = max(g.num_tokens for g in chunk)
        batch = batch_rows(chunk, [[j] for j in range(len(chunk))], buckets=shared_row_buckets(longest))
        out.append(pair_micro_batch(batch, chunk, separate=False))
    return out


def shared_packed_micro_batches(groups: Sequence[Group], capacity: int, num_buckets: int,
                                seed: int) -> list[MicroBatch]:
    """``shared-packed``: groups packed whole into rows of ``capacity`` tokens, one row per
    micro-batch, padded to one of ``num_buckets`` lengths."""
    buckets = bucket_lengths(capacity, num_buckets)
    rows = pack([g.num_tokens for g in groups], capacity, seed=seed)
    return [pair_micro_batch(batch_rows(groups, [row], buckets=buckets), [groups[i] for i in row], separate=False)
            for row in rows]


def separate_packed_micro_batches(groups: Sequence[Group], capacity: int, num_buckets: int,
                                  seed: int) -> list[MicroBatch]:
    """``separate-packed``: every prompt+response a single-response group of its own; a pair's
    two sequences are packed as one unit, so a pair never spans micro-batches."""
    buckets = bucket_lengths(capacity, num_buckets)
    rows = pack([g.num_separate_tokens for g in groups], capacity, seed=seed)
    out = []
    for row in rows:
        singles = [Group(groups[i].prompt_ids, [groups[i].response_ids[j]]) for i in row for j in (0, 1)]
        batch = batch_rows(singles, [list(range(len(singles)))], buckets=buckets)
        out.append(pair_micro_batch(batch, [groups[i] for i in row], separate=True))
    return out


# --- the groups of a step ------------------------------------------------------------------------

def default_pairs_per_step(groups: Sequence[Group], tokens: int, micro_pairs: int) -> int:
    """As many groups as fill ``tokens`` on average, rounded down to a multiple of ``micro_pairs``.

    >>> default_pairs_per_step([Group([1] * 60, [[2] * 20, [3] * 20])], tokens=1000, micro_pairs=4)
    8
    """
    mean = sum(g.num_tokens for g in groups) / len(groups)
    fill = max(1, int(tokens // mean))
    return max(micro_pairs, fill // micro_pairs * micro_pairs) if fill >= micro_pairs else fill


def fit_both_layouts(group: Group, capacity: int) -> Group:
    """Shorten a group (``packing.fit_group``'s rule) until even its separate layout fits a row.

    >>> fit_both_layouts(Group([1, 2, 3], [[4, 5, 6], [7, 8]]), 8).response_ids
    [[4], [7]]
    """
    while group.num_separate_tokens > capacity:
        group = fit_group(group, group.num_tokens - 1)
    return group
