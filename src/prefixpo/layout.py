"""The prefix-shared layout of a group, and batches of groups (docs/design.md sections 1 and 5).

A *group* is one prompt with n >= 1 responses. Its tokens are laid out flat, every response
restarting its positions at the prompt length::

    tokens     p0 p1 p2 p3 | a0 a1 a2 | b0 b1
    positions   0  1  2  3 |  4  5  6 |  4  5
    segment     0  0  0  0 |  1  1  1 |  2  2
    predictor   .  .  .  . |  3  4  5 |  3  7      (flat index of the hidden state predicting it)

Every token of a response is *scored*: the first from the last prompt position, every later
one from its predecessor in the same response. Prompt tokens are never scored here (an SFT
prompt-less row still has a prompt of at least one token, such as BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD_DOCUMENT = -1  # document id of padding tokens: they form their own document and are never scored
MAX_RESPONSES = 4095  # per group: a response's segment id (1, 2, ...) fits the 12 low bits of its mask code


@dataclass(frozen=True)
class Group:
    """One prompt and its responses, as token ids (``scores`` rank the responses, if known).

    ``pairs``: the group's own ``(chosen, rejected)`` response indices, when the data fixes them
    (rows that share a prompt, merged into one group); they are trained as they are, instead of
    pairs formed from ``scores`` (``step.batch_pair_indices``).
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[Sequence[int]]
    scores: Sequence[float] | None = None
    pairs: Sequence[Sequence[int]] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the shared layout: prompt once, plus every response."""
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)

    @property
    def num_separate_tokens(self) -> int:
        """Tokens the same group takes as separate prompt+response sequences."""
        return sum(len(self.prompt_ids) + len(r) for r in self.response_ids)


@dataclass(frozen=True)
class GroupLayout:
    """The flat layout of one group; ``scored_*`` have one entry per scored token.

    >>> g = layout_group(Group([10, 11, 12, 13], [[20, 21, 22], [30, 31]]))
    >>> g.input_ids
    [10, 11, 12, 13, 20, 21, 22, 30, 31]
    >>> g.position_ids
    [0, 1, 2, 3, 4, 5, 6, 4, 5]
    >>> g.segment_ids
    [0, 0, 0, 0, 1, 1, 1, 2, 2]
    >>> g.scored_source, g.scored_targets, g.scored_response
    ([3, 4, 5, 3, 7], [20, 21, 22, 30, 31], [0, 0, 0, 1, 1])
    """

    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    scored_source: list[int]
    scored_targets: list[int]
    scored_response: list[int]
    num_responses: int
    scores: list[float] | None = None
    pairs: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def layout_group(group: Group, share_prefix: bool = True) -> GroupLayout:
    """Lay out one group flat (see the module docstring for the rules).

    ``share_prefix=False`` is the standard recipe in the same format: each response follows its
    own copy of the prompt, and the copy carries the response's segment id, so the attention rule
    keeps every prompt+response separate (positions restart at 0 for each copy):

    >>> g = layout_group(Group([10, 11], [[20, 21], [30]]), share_prefix=False)
    >>> g.input_ids, g.position_ids, g.segment_ids
    ([10, 11, 20, 21, 10, 11, 30], [0, 1, 2, 3, 0, 1, 2], [1, 1, 1, 1, 2, 2, 2])
    >>> g.scored_source, g.scored_targets
    ([1, 2, 5], [20, 21, 30])
    """
    prompt = list(group.prompt_ids)
    responses = [list(r) for r in group.response_ids]
    if not prompt:
        raise ValueError("a group needs a prompt of at least one token (for example BOS): its last "
                         "position predicts the first token of every response")
    if not responses:
        raise ValueError("a group needs at least one response")
    if len(responses) > MAX_RESPONSES:
        raise ValueError(f"a group has {len(responses)} responses; the attention mask holds at most {MAX_RESPONSES}")
    for i, r in enumerate(responses):
        if not r:
            raise ValueError(f"response {i} of the group is empty: every response needs at least one token")
    num_prompt = len(prompt)
    input_ids, position_ids, segment_ids = [], [], []
    if share_prefix:
        input_ids, position_ids, segment_ids = list(prompt), list(range(num_prompt)), [0] * num_prompt
    scored_source: list[int] = []
    scored_targets: list[int] = []
    scored_response: list[int] = []
    for i, response in enumerate(responses):
        if not share_prefix:
            input_ids += prompt
            position_ids += range(num_prompt)
            segment_ids += [i + 1] * num_prompt
        start = len(input_ids)
        input_ids += response
        position_ids += range(num_prompt, num_prompt + len(response))
        segment_ids += [i + 1] * len(response)
        last_prompt = num_prompt - 1 if share_prefix else start - 1
        scored_source += [last_prompt] + list(range(start, start + len(response) - 1))
        scored_targets += response
        scored_response += [i] * len(response)
    scores = None
    if group.scores is not None:
        scores = [float(x) for x in group.scores]
        if len(scores) != len(responses):
            raise ValueError(f"the group has {len(responses)} responses but {len(scores)} scores")
    return GroupLayout(input_ids, position_ids, segment_ids, scored_source, scored_targets,
                       scored_response, len(responses), scores, check_pairs(group.pairs, len(responses)))


def check_pairs(pairs: Sequence[Sequence[int]] | None, num_responses: int) -> list[tuple[int, int]] | None:
    """A group's explicit pairs as ``(chosen, rejected)`` tuples, checked against its responses.

    >>> check_pairs([[0, 1], [2, 1]], 3)
    [(0, 1), (2, 1)]
    """
    if pairs is None:
        return None
    out = [(int(c), int(r)) for c, r in pairs]
    for c, r in out:
        if c == r or not (0 <= c < num_responses and 0 <= r < num_responses):
            raise ValueError(f"pair ({c}, {r}) does not name two different responses of a group of {num_responses}")
    return out


@dataclass
class Batch:
    """Rows of laid-out groups, padded to one length, ready for the model.

    Shapes: ``input_ids``, ``position_ids``, ``document_ids``, ``segment_ids`` are ``[rows, T]``;
    ``scored_index`` (flat index into ``rows * T`` of the predicting hidden state),
    ``scored_targets`` and ``scored_response`` are ``[S]`` over all scored tokens;
    ``response_lengths`` and ``response_group`` are ``[R]`` over all responses, in group order
    and response order within a group. ``document_ids`` numbers the groups of the batch
    (padding is ``PAD_DOCUMENT``). ``response_scores`` ``[R]`` holds the groups' scores (NaN for
    a group without scores).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    segment_ids: torch.Tensor
    scored_index: torch.Tensor
    scored_targets: torch.Tensor
    scored_response: torch.Tensor
    response_lengths: torch.Tensor
    response_group: torch.Tensor
    num_groups: int
    response_scores: torch.Tensor | None = None  # [R] float, NaN where a group has no scores
    group_ids: torch.Tensor | None = None  # [num_groups] the caller's ids of the batch's groups
    # [P, 3] (chosen, rejected, group) of the groups with explicit pairs, flat response indices
    explicit_pairs: torch.Tensor | None = None

    @property
    def num_responses(self) -> int:
        return int(self.response_lengths.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``. From the host to an accelerator its tensors travel as one buffer
        per dtype (pinned for CUDA, copied asynchronously): a copy per field costs the host more
        than the data."""
        device = torch.device(device)
        fields = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        if device.type == "cpu" or any(v.device.type != "cpu" for v in fields.values()):
            return Batch(**{**vars(self), **{k: v.to(device, non_blocking=non_blocking) for k, v in fields.items()}})
        pin = device.type == "cuda" and torch.cuda.is_available()
        return Batch(**{**vars(self), **copy_together(fields, device, pin=pin)})


def copy_together(tensors: dict[str, torch.Tensor], device: torch.device | str,
                  pin: bool = False) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``, copied as one flat buffer per dtype (pinned first with ``pin``, so
    the copy does not hold the host up), then cut back into views of their shapes.

    >>> out = copy_together({"a": torch.arange(6).view(2, 3), "b": torch.tensor([7]), "c": torch.ones(2)}, "cpu")
    >>> out["a"].tolist(), out["b"].tolist(), out["c"].dtype
    ([[0, 1, 2], [3, 4, 5]], [7], torch.float32)
    """
    out: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in names])
        flat = flat.pin_memory() if pin else flat
        on_device = flat.to(device, non_blocking=pin)
        for k, piece in zip(names, on_device.split([tensors[k].numel() for k in names]), strict=True):
            out[k] = piece.view(tensors[k].shape)
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_batch(rows: Sequence[Sequence[GroupLayout]], row_length: int | None = None,
                pad_to_multiple_of: int = 1, pad_token_id: int = 0,
                group_ids: Sequence[Sequence[int]] | None = None) -> Batch:
    """Concatenate the groups of each row, pad every row to one length and index the scored tokens.

    ``row_length`` defaults to the longest row rounded up to ``pad_to_multiple_of``. One group per
    row is the unpacked layout; several groups per row is packing (groups never see each other).
    ``group_ids`` (nested like ``rows``) are kept, flattened, as ``Batch.group_ids``.

    >>> a = layout_group(Group([1, 2], [[3], [4, 5]]))
    >>> b = layout_group(Group([6], [[7]]))
    >>> batch = build_batch([[a, b]], row_length=8)
    >>> batch.document_ids.tolist(), batch.position_ids.tolist()
    ([[0, 0, 0, 0, 0, 1, 1, -1]], [[0, 1, 2, 2, 3, 0, 1, 0]])
    >>> batch.scored_index.tolist(), batch.scored_response.tolist(), batch.response_lengths.tolist()
    ([1, 1, 3, 5], [0, 1, 1, 2], [1, 2, 1])
    """
    lengths = [sum(len(g) for g in row) for row in rows]
    if row_length is None:
        row_length = round_up(max(lengths, default=1), pad_to_multiple_of)
    if any(n > row_length for n in lengths):
        raise ValueError(f"a row holds {max(lengths)} tokens, more than its length {row_length}")
    shape = (len(rows), row_length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    scored_index: list[int] = []
    scored_targets: list[int] = []
    scored_response: list[int] = []
    response_lengths: list[int] = []
    response_group: list[int] = []
    response_scores: list[float] = []
    explicit: list[tuple[int, int, int]] = []
    group_index = 0
    for r, row in enumerate(rows):
        offset = 0
        for g in row:
            span = slice(offset, offset + len(g))
            input_ids[r, span] = torch.tensor(g.input_ids)
            position_ids[r, span] = torch.tensor(g.position_ids)
            document_ids[r, span] = group_index
            segment_ids[r, span] = torch.tensor(g.segment_ids)
            base = r * row_length + offset
            first_response = len(response_lengths)
            scored_index += [base + s for s in g.scored_source]
            scored_targets += g.scored_targets
            scored_response += [first_response + i for i in g.scored_response]
            response_lengths += [g.scored_response.count(i) for i in range(g.num_responses)]
            response_group += [group_index] * g.num_responses
            response_scores += list(g.scores) if g.scores is not None else [float("nan")] * g.num_responses
            explicit += [(first_response + c, first_response + j, group_index) for c, j in g.pairs or ()]
            offset += len(g)
            group_index += 1
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        document_ids=document_ids,
        segment_ids=segment_ids,
        scored_index=torch.tensor(scored_index, dtype=torch.long),
        scored_targets=torch.tensor(scored_targets, dtype=torch.long),
        scored_response=torch.tensor(scored_response, dtype=torch.long),
        response_lengths=torch.tensor(response_lengths, dtype=torch.long),
        response_group=torch.tensor(response_group, dtype=torch.long),
        num_groups=group_index,
        response_scores=torch.tensor(response_scores, dtype=torch.float32),
        group_ids=(torch.tensor([i for row in group_ids for i in row], dtype=torch.long)
                   if group_ids is not None else None),
        explicit_pairs=torch.tensor(explicit, dtype=torch.long).reshape(-1, 3) if explicit else None,
    )


def collate_groups(groups: Sequence[Group], pad_to_multiple_of: int = 1, pad_token_id: int = 0) -> Batch:
    """The unpacked batch: one group per row, rows padded to the longest."""
    return build_batch([[layout_group(g)] for g in groups], pad_to_multiple_of=pad_to_multiple_of,
                       pad_token_id=pad_token_id)
