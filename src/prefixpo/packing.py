"""Packing whole groups into fixed-capacity rows, and spreading rows over ranks (docs/design.md section 2).

Groups are never split. Each epoch the groups are shuffled (seed + epoch), cut into windows,
and each window is packed first-fit-decreasing, so rows fill well while the data order stays
random and reproducible. Rows are padded to a multiple of 128, or to the smallest of a few
bucket lengths, so that statically compiled kernels see few shapes::

    lengths [5, 3, 4, 2], capacity 8, window 4 -> decreasing 5 4 3 2 -> rows [[5, 3], [4, 2]]
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from prefixpo.layout import Batch, Group, build_batch, layout_group, round_up

TRUNCATION_POLICIES = ("error", "truncate", "drop")


@dataclass(frozen=True)
class PackingConfig:
    """``capacity``: tokens per row (a multiple of 128). ``window``: groups packed together (the
    larger, the fuller the rows, the less local the shuffle). ``num_buckets``: row lengths used.
    ``truncation``: what happens to a group longer than a row."""

    capacity: int = 8192
    window: int = 1000
    num_buckets: int = 4
    truncation: str = "error"

    def __post_init__(self) -> None:
        if self.capacity < 128 or self.capacity % 128:
            raise ValueError(f"packing_capacity must be a positive multiple of 128, got {self.capacity}")
        if self.window < 1 or self.num_buckets < 1:
            raise ValueError("packing window and num_buckets must be at least 1")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"unknown truncation policy {self.truncation!r}; choose one of "
                             f"{', '.join(TRUNCATION_POLICIES)}")


def bucket_lengths(capacity: int, num_buckets: int) -> list[int]:
    """Evenly spaced row lengths, multiples of 128, ending at ``capacity``.

    >>> bucket_lengths(8192, 4)
    [2048, 4096, 6144, 8192]
    >>> bucket_lengths(384, 4)
    [128, 256, 384]
    """
    lengths = {-(-capacity * k // num_buckets // 128) * 128 for k in range(1, num_buckets + 1)}
    return sorted(n for n in lengths if n > 0)


def row_length(used: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``used`` tokens."""
    for n in buckets:
        if used <= n:
            return n
    raise ValueError(f"{used} tokens exceed the largest bucket {buckets[-1]}")


def batch_rows(groups: Sequence[Group], rows: Sequence[Sequence[int]], *, prefix_sharing: bool = True,
               buckets: Sequence[int] | None = None, pad_to_multiple_of: int = 1) -> Batch:
    """The one way groups become a batch (training, evaluation, the reference, verification, the
    benchmark): row ``r`` holds the groups ``rows[r]`` (indices into ``groups``), each laid out with
    its prompt shared (or, without ``prefix_sharing``, copied before every response), one after the
    other. Rows are padded to one length: the smallest of ``buckets`` that holds the longest row,
    or else the longest rounded up to ``pad_to_multiple_of``. ``Batch.group_ids`` are the indices.

    >>> groups = [Group([1, 2], [[3], [4, 5]]), Group([6], [[7]]), Group([8], [[9, 10]])]
    >>> batch = batch_rows(groups, [[0, 1], [2]], pad_to_multiple_of=4)
    >>> batch.input_ids.shape, batch.group_ids.tolist()
    (torch.Size([2, 8]), [0, 1, 2])
    >>> batch_rows(groups, [[0], [1, 2]], buckets=[128, 256]).input_ids.shape
    torch.Size([2, 128])
    """
    layouts = [[layout_group(groups[i], prefix_sharing) for i in row] for row in rows]
    used = max(1, max((sum(len(lay) for lay in row) for row in layouts), default=1))
    length = row_length(used, buckets) if buckets else round_up(used, pad_to_multiple_of)
    return build_batch(layouts, row_length=length, group_ids=rows)


def fit_group(group: Group, capacity: int) -> Group:
    """Shorten a group to ``capacity`` tokens: the longest response loses its last token until the
    group fits; when every response is down to one token, the prompt loses its first tokens.

    >>> fit_group(Group([1, 2, 3], [[4, 5, 6, 7], [8, 9]]), 7).response_ids
    [[4, 5], [8, 9]]
    """
    prompt = list(group.prompt_ids)
    responses = [list(r) for r in group.response_ids]
    excess = len(prompt) + sum(map(len, responses)) - capacity
    while excess > 0:
        longest = max(range(len(responses)), key=lambda i: len(responses[i]))
        if len(responses[longest]) > 1:
            responses[longest].pop()
        elif len(prompt) > 1:
            prompt.pop(0)
        else:
            raise ValueError(f"a group of {len(responses)} responses cannot fit in {capacity} tokens")
        excess -= 1
    return Group(prompt, responses, group.scores, group.pairs)


def check_lengths(groups: Sequence[Group], config: PackingConfig) -> tuple[list[Group], list[int], list[int]]:
    """Apply the truncation policy before any row is built: returns the groups to pack, the
    indices that were truncated and the indices that were dropped. With ``error`` a group longer
    than a row raises, naming it, before training starts."""
    kept, truncated, dropped = [], [], []
    for i, g in enumerate(groups):
        if g.num_tokens <= config.capacity:
            kept.append(g)
        elif config.truncation == "truncate":
            kept.append(fit_group(g, config.capacity))
            truncated.append(i)
        elif config.truncation == "drop":
            dropped.append(i)
        else:
            raise ValueError(
                f"group {i} has {g.num_tokens} tokens (prompt {len(g.prompt_ids)}, responses "
                f"{[len(r) for r in g.response_ids]}), more than packing_capacity {config.capacity}; raise "
                "packing_capacity, lower max_length, or set the packing truncation to 'truncate' or 'drop'")
    return kept, truncated, dropped


def pack(lengths: Sequence[int], capacity: int, seed: int, window: int = 1000) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows of at most ``capacity`` tokens, rows in random order.

    Deterministic in ``seed``; every index appears in exactly one row.

    >>> pack([5, 3, 4, 2], capacity=8, seed=0, window=4)
    [[0, 1], [2, 3]]
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a group of {max(lengths)} tokens exceeds the row capacity {capacity}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        open_rows: list[list[int]] = []
        free: list[int] = []
        for i in chunk:
            for r, room in enumerate(free):
                if lengths[i] <= room:
                    open_rows[r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                open_rows.append([i])
                free.append(capacity - lengths[i])
        rows += open_rows
    rng.shuffle(rows)
    return rows


def split_rows_over_ranks(rows: Sequence[Sequence[int]], lengths: Sequence[int], world_size: int,
                          seed: int) -> list[list[list[int]]]:
    """Deal rows to ranks: every rank gets the same number of rows (empty rows fill the last
    round) and, at each step, rows of similar token counts, so no rank waits long for another.

    Rows are sorted by tokens, cut into rounds of ``world_size``, dealt in snake order, and the
    rounds shuffled (the same permutation on every rank).

    >>> split_rows_over_ranks([[0], [1], [2]], [5, 3, 4], world_size=2, seed=0)
    [[[0], []], [[2], [1]]]
    """
    tokens = [sum(lengths[i] for i in row) for row in rows]
    ordered = [list(rows[i]) for i in sorted(range(len(rows)), key=lambda i: -tokens[i])]
    ordered += [[] for _ in range(-len(ordered) % world_size)]
    rounds = [ordered[k:k + world_size] for k in range(0, len(ordered), world_size)]
    for k in range(1, len(rounds), 2):
        rounds[k].reverse()
    random.Random(seed).shuffle(rounds)
    return [[r[rank] for r in rounds] for rank in range(world_size)]


@dataclass(frozen=True)
class PackingStats:
    """``fill_ratio``: real tokens / (rows x capacity); ``padded_fill``: real tokens / padded row
    tokens; ``sharing_saving``: tokens as separate sequences / tokens as shared groups."""

    num_groups: int
    num_rows: int
    tokens: int
    separate_tokens: int
    capacity: int
    padded_tokens: int

    @property
    def fill_ratio(self) -> float:
        return self.tokens / max(self.num_rows * self.capacity, 1)

    @property
    def padded_fill(self) -> float:
        return self.tokens / max(self.padded_tokens, 1)

    @property
    def groups_per_row(self) -> float:
        return self.num_groups / max(self.num_rows, 1)

    @property
    def sharing_saving(self) -> float:
        return self.separate_tokens / max(self.tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {"groups": self.num_groups, "rows": self.num_rows, "fill_ratio": round(self.fill_ratio, 4),
                "padded_fill": round(self.padded_fill, 4), "groups_per_row": round(self.groups_per_row, 2),
                "sharing_saving": round(self.sharing_saving, 4)}


def packing_stats(groups: Sequence[Group], rows: Sequence[Sequence[int]], config: PackingConfig,
                  buckets: Sequence[int] | None = None, multiple_of: int = 0) -> PackingStats:
    """How full ``rows`` are; rows padded to a multiple of ``multiple_of`` when it is set, else to the
    smallest of ``buckets`` (default: evenly spaced lengths up to the capacity) that holds them."""
    buckets = [] if multiple_of else buckets or bucket_lengths(config.capacity, config.num_buckets)
    used = [sum(groups[i].num_tokens for i in row) for row in rows]
    return PackingStats(
        num_groups=sum(len(r) for r in rows),
        num_rows=len(rows),
        tokens=sum(used),
        separate_tokens=sum(groups[i].num_separate_tokens for row in rows for i in row),
        capacity=config.capacity,
        padded_tokens=sum(round_up(u, multiple_of) if multiple_of else row_length(u, buckets) for u in used if u),
    )


Row = list[int]  # the indices of the groups laid out in one row
MicroBatch = list[Row]
Step = list[MicroBatch]  # the micro-batches of one optimizer step on one rank


def pack_rows(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[Row]:
    """``indices`` packed first-fit decreasing into rows of at most ``capacity`` tokens (as few rows
    as the capacity allows, in a deterministic order).

    >>> pack_rows([0, 1, 2, 3], [5, 3, 4, 2], capacity=8)
    [[0, 1], [2, 3]]
    """
    rows: list[Row] = []
    free: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"a group of {lengths[i]} tokens exceeds the row capacity {capacity}")
        r = next((r for r, room in enumerate(free) if lengths[i] <= room), None)
        if r is None:
            rows.append([i])
            free.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            free[r] -= lengths[i]
    return rows


def plan_epoch(lengths: Sequence[int], *, seed: int, epoch: int, packing: PackingConfig | None,
               micro_batch_size: int = 1, gradient_accumulation_steps: int = 1, world_size: int = 1,
               rank: int = 0) -> list[Step]:
    """This rank's optimizer steps for one epoch: ``steps[s][m]`` is micro-batch ``m`` of step ``s``,
    a list of rows, each a list of group indices.

    The epoch's groups, in an order that depends on ``seed`` and ``epoch`` only, are cut into
    optimizer steps of ``micro_batch_size * gradient_accumulation_steps * world_size`` groups, the
    batch TRL's config names (the last step of an epoch may hold fewer). Each step's groups are dealt
    to ranks by token count (``split_rows_over_ranks``), so a step trains the same groups whatever the
    split of its batch into ranks and accumulation steps, and packing decides only how a rank's
    groups are laid out:

    - unpacked: micro-batches of ``micro_batch_size`` rows, one group per row;
    - packed: the rank's groups of the step packed into as few rows of at most
      ``packing.capacity`` tokens as fit (``pack_rows``), one row per micro-batch.

    Every rank gets the same number of steps and, in each step, of micro-batches (empty rows fill
    in), so engines whose forward is a collective stay in step. Every group appears exactly once
    across ranks and steps.

    >>> steps = plan_epoch([5, 3, 4, 2], seed=0, epoch=0, packing=None, micro_batch_size=2)
    >>> [[len(mb) for mb in step] for step in steps], sorted(i for s in steps for mb in s for r in mb for i in r)
    ([[2], [2]], [0, 1, 2, 3])
    >>> plan_epoch([5, 3, 4, 2], seed=0, epoch=0, packing=PackingConfig(capacity=128), micro_batch_size=4)
    [[[[0, 2, 1, 3]]]]
    """
    return plan_epoch_ranks(lengths, seed=seed, epoch=epoch, packing=packing, micro_batch_size=micro_batch_size,
                            gradient_accumulation_steps=gradient_accumulation_steps, world_size=world_size)[rank]


def plan_epoch_ranks(lengths: Sequence[int], *, seed: int, epoch: int, packing: PackingConfig | None,
                     micro_batch_size: int = 1, gradient_accumulation_steps: int = 1,
                     world_size: int = 1) -> list[list[Step]]:
    """Every rank's steps of ``plan_epoch``, planned once: ``plans[rank][step]``. (A rank's plan
    depends on the others': packed, every rank runs as many micro-batches as the one with the most.)"""
    epoch_seed = seed * 100_003 + epoch
    order = list(range(len(lengths)))
    random.Random(epoch_seed).shuffle(order)
    per_step = micro_batch_size * gradient_accumulation_steps * world_size
    plans: list[list[Step]] = [[] for _ in range(world_size)]
    for start in range(0, len(order), per_step):
        ranks = split_rows_over_ranks([[i] for i in order[start:start + per_step]], lengths, world_size,
                                      seed=epoch_seed + start)
        if packing is None:
            for plan, mine in zip(plans, ranks):
                plan.append([mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)])
            continue
        rows = [pack_rows([i for row in r for i in row], lengths, packing.capacity) for r in ranks]
        most = max(len(r) for r in rows)
        for plan, mine in zip(plans, rows):
            plan.append([[row] for row in mine + [[] for _ in range(most - len(mine))]])
    return plans


def data_buckets(used: Sequence[int], capacity: int, num_buckets: int) -> list[int]:
    """Row lengths (multiples of 128) for rows of ``used`` tokens: the ``k / num_buckets``
    quantiles of the rows, rounded up, and ``capacity`` last, so that every row a plan can make
    (at most ``capacity`` tokens) has a length, and each length is one compiled shape.

    >>> data_buckets([100, 200, 300, 1000, 90, 120], capacity=1024, num_buckets=3)
    [128, 256, 1024]
    """
    sizes = sorted(round_up(max(u, 1), 128) for u in used)
    if not sizes:
        return [capacity]
    cuts = {sizes[max(math.ceil(len(sizes) * k / num_buckets) - 1, 0)] for k in range(1, num_buckets)}
    return sorted(c for c in cuts if c < capacity) + [capacity]
