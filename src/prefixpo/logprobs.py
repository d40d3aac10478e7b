"""Log-probs of scored tokens only, in chunks, never materialising [tokens x vocab] (docs/design.md section 1).

``scored_token_logprobs`` computes, for hidden states ``h [S, H]`` and targets ``t [S]``::

    logp[s] = log_softmax(transform(h[s] @ W.T + b))[t[s]]        (fp32)

chunk by chunk. Its backward recomputes each chunk's logits instead of keeping them, so forward
and backward hold at most one chunk's ``[chunk, V]`` logits at a time. ``reduce_per_response``
sums them per response. Pure maths on tensors: the model side (``ScoredLM``, ``compute_logps``)
is in ``prefixpo.modeling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefixpo.layout import Batch

DEFAULT_CHUNK_SIZE = 1024


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """Logits ``[N, V]`` of hidden states ``[N, H]`` in fp32 (or wider), with the model's logit transform."""
    return _transform(F.linear(hidden, weight, bias), softcap, scale)


def _transform(logits: torch.Tensor, softcap: float | None, scale: float | None) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunk_forward(raw: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and logsumexp ``[N]`` of one chunk's raw head output ``[N, V]``."""
    logits = _transform(raw, softcap, scale)
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, targets[:, None]).squeeze(1) - lse, lse


def _chunk_backward(raw: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor,
                    softcap: float | None, scale: float | None) -> torch.Tensor:
    """Gradient ``[N, V]`` (in ``raw``'s dtype) of ``sum(grad_logps * logp[target])`` w.r.t. ``raw``:
    ``g * (onehot(target) - softmax(logits))``, through the softcap (``d/dx c tanh(x/c) = 1 - (y/c)^2``)
    and the scale."""
    logits = _transform(raw, softcap, scale)
    g = grad_logps.to(logits.dtype)[:, None]
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    grad = g * (onehot.to(logits.dtype) - torch.exp(logits - lse[:, None]))
    if softcap is not None:
        grad = grad * (1.0 - (logits / softcap) ** 2)
    if scale is not None:
        grad = grad * scale
    return grad.to(raw.dtype)


_fused: dict[str, object] = {}


def _chunk_kernels(fused: bool):
    """The per-chunk functions: as written (CPU default), or compiled by ``torch.compile`` into one
    fused kernel each (GPU default). Fused, a chunk's ``[N, V]`` logits are read once in the head's
    dtype instead of being upcast, exponentiated and scattered in separate fp32 passes."""
    if not fused:
        return _chunk_forward, _chunk_backward
    if not _fused:
        _fused["forward"] = torch.compile(_chunk_forward, dynamic=None)
        _fused["backward"] = torch.compile(_chunk_backward, dynamic=None)
    return _fused["forward"], _fused["backward"]


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``n`` rows in near-equal chunks of at most ``chunk_size`` (no tiny last chunk, which would
    give the compiled kernels one more shape).

    >>> _chunks(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    >>> _chunks(2049, 1024)
    [(0, 683), (683, 1366), (1366, 2049)]
    """
    count = max(1, -(-n // chunk_size))
    size = -(-n // count)
    return [(start, min(start + size, n)) for start in range(0, n, size)] if n else []


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _ScoredTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale, fused):
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        forward_chunk, _ = _chunk_kernels(fused)
        logps = torch.empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            for start, end in _chunks(hidden.shape[0], chunk_size):
                raw = F.linear(hidden[start:end].to(dtype), w, b)
                logps[start:end], lse[start:end] = forward_chunk(raw, targets[start:end], softcap, scale)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options = (chunk_size, softcap, scale, dtype, fused)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, softcap, scale, dtype, fused = ctx.options
        _, backward_chunk = _chunk_kernels(fused)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        wide = torch.promote_types(dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if need_bias else None
        for start, end in _chunks(hidden.shape[0], chunk_size):
            h = hidden[start:end].to(dtype)
            raw = F.linear(h, w, b)
            grad = backward_chunk(raw, targets[start:end], lse[start:end], grad_logps[start:end], softcap, scale)
            del raw
            if need_hidden:
                grad_hidden[start:end] = (grad @ w).to(hidden.dtype)
            if need_weight:
                grad_weight.add_(grad.t() @ h)
            if need_bias:
                grad_bias.add_(grad.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def scored_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, softcap: float | None = None,
                          scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          fused: bool | None = None) -> torch.Tensor:
    """Log-probs ``[S]`` of ``targets [S]`` under hidden states ``[S, H]``, ``chunk_size`` tokens at a time.

    The result is fp32 for fp32/bf16/fp16 weights (fp64 for fp64 weights). ``fused``: compile each
    chunk's softmax work into one kernel (default: on CUDA)."""
    if chunk_size < 1:
        raise ValueError(f"logps_chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states for {targets.shape[0]} targets")
    if fused is None:
        fused = hidden.is_cuda
    return _ScoredTokenLogprobs.apply(hidden, weight, bias, targets, chunk_size, softcap, scale, fused)


@torch.no_grad()
def scored_token_log_sum_sq(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            softcap: float | None = None, scale: float | None = None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``log sum_v p(v)^2`` ``[S]`` (fp32, no gradient) of each scored position's next-token
    distribution, ``chunk_size`` positions at a time: ``logsumexp(2 z) - 2 logsumexp(z)``. WPO's
    weights use it (``prefixpo.step.wpo_weights``)."""
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    out = torch.empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start, end in _chunks(hidden.shape[0], chunk_size):
            logits = _transform(F.linear(hidden[start:end].to(dtype), w, b), softcap, scale)
            out[start:end] = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
    return out


@dataclass
class ResponseLogps:
    """Per-response results, in the batch's response order. ``sums``, ``means``: fp32 ``[R]``;
    ``counts``: scored tokens per response ``[R]``; ``token_logps``: fp32 ``[S]``;
    ``token_log_sum_sq``: ``log sum_v p(v)^2`` ``[S]`` where asked for (WPO), else None."""

    sums: torch.Tensor
    means: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor
    token_log_sum_sq: torch.Tensor | None = None


def reduce_per_response(token_logps: torch.Tensor, batch: Batch) -> ResponseLogps:
    """Sum token log-probs ``[S]`` into their responses.

    >>> from prefixpo.layout import Group, collate_groups
    >>> batch = collate_groups([Group([1], [[2, 3], [4]])])
    >>> reduce_per_response(torch.tensor([-1.0, -2.0, -0.5]), batch).sums.tolist()
    [-3.0, -0.5]
    """
    counts = batch.response_lengths.to(token_logps.device)
    token_logps = token_logps.float()  # sums of thousands of tokens need fp32, whatever the input
    sums = torch.zeros(counts.shape[0], dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, batch.scored_response.to(token_logps.device), token_logps)
    return ResponseLogps(sums=sums, means=sums / counts, counts=counts, token_logps=token_logps)
