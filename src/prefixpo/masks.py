"""The attention rule, written once, and its two backends (docs/design.md section 3).

Polarity, everywhere in this package: **True means query q may attend to key k.**

q sees k iff k is not after q, both are in the same document (group), k is in the prompt
(segment 0) or in q's own response, and, for sliding-window layers, the positions of q and k
are less than the window apart. Padding is a document of its own, so it never reaches a real
token and no row is fully masked. For the group ``p p | a a | b``::

        p p a a b
    p   1 . . . .
    p   1 1 . . .
    a   1 1 1 . .
    a   1 1 1 1 .
    b   1 1 . . 1        <- b sees the prompt and itself, never its sibling a
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from prefixpo.layout import MAX_RESPONSES, Batch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SEGMENT_BITS = MAX_RESPONSES.bit_length()  # the low bits of a token's code: its segment (response)


def token_codes(document_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """One int32 code per token, ``document * 4096 + segment``, so the rule reads two values per
    (q, k) instead of four. A prompt token's code is its group's code with the low bits clear.
    (``layout_group`` refuses a group with more responses than the low bits hold.)

    >>> token_codes(torch.tensor([[0, 0, 1, -1]]), torch.tensor([[0, 2, 1, 0]])).tolist()
    [[0, 2, 4097, -4096]]
    """
    return (document_ids.to(torch.int32) << SEGMENT_BITS) | segment_ids.to(torch.int32)


def prefix_mask_mod(document_ids: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                    sliding_window: int | None = None) -> MaskMod:
    """The attention predicate ``(b, h, q, k) -> bool`` over ``[rows, T]`` layout tensors.

    The same function serves FlexAttention (scalar index tensors) and the dense builder
    (broadcast index tensors). With ``code = document * 4096 + segment``, k is visible to q iff
    k <= q and k's code is q's own (same response, or both in the same prompt) or that of q's group
    prompt (q's code with the segment bits cleared).
    """
    codes = token_codes(document_ids, segment_ids)
    prompt_bits = ~((1 << SEGMENT_BITS) - 1)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        code_q, code_k = codes[b, q], codes[b, k]
        allowed = (k <= q) & ((code_k == code_q) | (code_k == (code_q & prompt_bits)))
        if sliding_window is not None:
            allowed = allowed & (position_ids[b, q] - position_ids[b, k] < sliding_window)
        return allowed

    return mask_mod


def dense_mask(batch: Batch, sliding_window: int | None = None) -> torch.Tensor:
    """The rule as a dense boolean mask ``[rows, 1, T, T]`` (the SDPA backend and the test oracle)."""
    rows, length = batch.shape
    device = batch.input_ids.device
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(length, device=device)[None, :, None]
    k = torch.arange(length, device=device)[None, None, :]
    mask_mod = prefix_mask_mod(batch.document_ids, batch.segment_ids, batch.position_ids, sliding_window)
    return mask_mod(b, None, q, k)[:, None]  # type: ignore[arg-type]


def _block_mask(document_ids: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                sliding_window: int | None, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = document_ids.shape
    mask_mod = prefix_mask_mod(document_ids, segment_ids, position_ids, sliding_window)
    return create_block_mask(mask_mod, rows, None, length, length, device=document_ids.device, BLOCK_SIZE=block_size)


@functools.cache
def _compiled_block_mask():
    return torch.compile(_block_mask, dynamic=None)


def flex_block_mask(batch: Batch, sliding_window: int | None = None, block_size: int = 128, compiled: bool | None = None):
    """The rule as a FlexAttention ``BlockMask``; blocks with no allowed pair are skipped.

    ``compiled`` (default: on CUDA) builds it through ``torch.compile``, so the dense [T, T]
    predicate is never materialised: one graph for every row length (the length is marked
    dynamic; the window and block size are constants of the graph).
    """
    layout = (batch.document_ids, batch.segment_ids, batch.position_ids)
    if not (batch.input_ids.device.type == "cuda" if compiled is None else compiled):
        return _block_mask(*layout, sliding_window, block_size)
    for t in layout:
        torch._dynamo.mark_dynamic(t, 1)
    return _compiled_block_mask()(*layout, sliding_window, block_size)
