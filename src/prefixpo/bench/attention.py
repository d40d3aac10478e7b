"""``prefixpo bench --attention``: one attention call, FlexAttention against SDPA, by length.

Masks (True means q may attend to k): ``causal``, and ``shared-prefix``: the row is packed with
groups of ``min(T, 2048)`` tokens, each a prompt of half the group and two responses of a quarter
(prefixpo's rule: a response sees its prompt and itself). Methods:

    flex         compiled FlexAttention with a BlockMask (empty blocks skipped)
    sdpa-flash   SDPA FlashAttention, ``is_causal=True`` (causal mask only)
    sdpa-dense   SDPA with the dense boolean mask [T, T]

Batch 1, 16 heads, head dim 64, bf16 on CUDA. Every method is first checked against the dense
path in fp32 (max abs error of the output and of dq, dk, dv), then timed with CUDA events:
median of ``--repeats`` forwards and forward+backwards after warm-up. On CPU it runs as a smoke
test (fp32, flex forward only: FlexAttention has no CPU backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prefixpo.masks import prefix_mask_mod

HEADS, HEAD_DIM = 16, 64
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]


def shared_prefix_layout(length: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``document_ids``, ``segment_ids``, ``position_ids`` ``[1, T]`` of groups of ``min(T, 2048)``
    tokens (prompt 1/2, two responses 1/4 each); a short tail is one more group.

    >>> doc, seg, pos = shared_prefix_layout(8, "cpu")
    >>> seg.tolist(), pos.tolist()
    ([[0, 0, 0, 0, 1, 1, 2, 2]], [[0, 1, 2, 3, 4, 5, 4, 5]])
    """
    group = min(length, 2048)
    doc, seg, pos = [], [], []
    for start in range(0, length, group):
        n = min(group, length - start)
        p, r = n - 2 * (n // 4), n // 4
        doc += [start // group] * n
        seg += [0] * p + [1] * r + [2] * r
        pos += list(range(p)) + list(range(p, p + r)) * 2
    return tuple(torch.tensor([x], device=device) for x in (doc, seg, pos))  # type: ignore[return-value]


def mask_mod_for(mask: str, length: int, device: torch.device | str) -> Callable:
    """The ``mask_mod`` (FlexAttention's predicate) of ``mask``: causal, or prefixpo's rule over
    ``shared_prefix_layout``."""
    if mask == "causal":
        return lambda b, h, q, k: k <= q
    return prefix_mask_mod(*shared_prefix_layout(length, device))


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """``time(fn) -> seconds`` of one call: CUDA events on the GPU, perf_counter on the CPU."""
    def time_cuda(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def time_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cuda if device.type == "cuda" else time_cpu


def methods(mask: str, mask_mod: Callable, length: int,
            device: torch.device) -> tuple[dict[str, Callable[..., torch.Tensor]], torch.Tensor]:
    """``name -> attend(q, k, v)`` for the methods that support ``mask``, and the dense boolean
    mask ``[T, T]``."""
    block_mask = create_block_mask(mask_mod, 1, None, length, length, device=device)
    dense = mask_mod(torch.zeros((), dtype=torch.long, device=device), None,
                     torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :])
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    out = {"flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
           "sdpa-dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)}
    if mask == "causal":
        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if device.type != "cuda":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out["sdpa-flash"] = flash
    return out, dense


def time_method(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
                with_backward: bool, repeats: int, timer: Callable) -> tuple[float, float | None]:
    """Median seconds of a forward and of a forward+backward, after three warm-up rounds."""
    def forward() -> None:
        fn(*inputs)

    def forward_backward() -> None:
        fn(*inputs).backward(grad_out)

    for _ in range(3):
        forward()
        if with_backward:
            forward_backward()
    fwd = statistics.median(timer(forward) for _ in range(repeats))
    fwd_bwd = statistics.median(timer(forward_backward) for _ in range(repeats)) if with_backward else None
    return fwd, fwd_bwd


def bench_one(length: int, mask: str, repeats: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Check every method of ``mask`` at ``length`` against the dense path in fp32, then time it."""
    gen = torch.Generator(device=device).manual_seed(length)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v, grad_out = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    mask_mod = mask_mod_for(mask, length, device)
    attend, dense = methods(mask, mask_mod, length, device)
    pairs = int(dense.sum())
    # the oracle: the dense path in fp32
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*ref_in, attn_mask=dense)
    ref_out.backward(grad_out.float())
    ref_grads = [x.grad for x in ref_in]
    timer = _timer(device)
    rows = []
    for name, fn in attend.items():
        with_backward = not (name == "flex" and device.type == "cpu")
        inputs = [x.detach().requires_grad_(with_backward) for x in (q, k, v)]
        out = fn(*inputs)
        err = {"out_max_abs_err": (out.float() - ref_out).abs().max().item()}
        if with_backward:
            out.backward(grad_out)
            err["grad_max_abs_err"] = max((x.grad.float() - g).abs().max().item() for x, g in zip(inputs, ref_grads))

        fwd, fwd_bwd = time_method(fn, inputs, grad_out, with_backward, repeats, timer)
        flops = 4 * HEADS * HEAD_DIM * pairs  # QK^T and PV over the allowed pairs
        rows.append({"length": length, "mask": mask, "method": name, "allowed_pairs": pairs,
                     "density": pairs / length**2, "fwd_ms": 1e3 * fwd,
                     "fwd_bwd_ms": fwd_bwd and 1e3 * fwd_bwd,
                     "fwd_tflops": flops / fwd / 1e12,
                     # backward = 2.5x forward (FlashAttention's convention: recompute + 4 matmuls)
                     "fwd_bwd_tflops": fwd_bwd and 3.5 * flops / fwd_bwd / 1e12, **err})
    return rows


def plot(rows: list[dict], path: str) -> str | None:
    """Forward+backward ms by length, one panel per mask, to ``path``; a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mask in zip(axes, ("causal", "shared-prefix")):
        for method in ("flex", "sdpa-flash", "sdpa-dense"):
            pts = [(r["length"], r["fwd_bwd_ms"] or r["fwd_ms"]) for r in rows
                   if r["mask"] == mask and r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="total length (tokens)", title=f"{mask} mask, fwd+bwd")
        ax.legend()
    axes[0].set_ylabel("ms (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def run_attention(args: argparse.Namespace, device: torch.device) -> int:
    """``prefixpo bench --attention``: every length and mask, JSON lines, a plot and a table."""
    lengths = args.lengths or DEFAULT_LENGTHS
    if any(n < 8 for n in lengths):
        print("prefixpo bench: error: --lengths must be at least 8", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # one static compile per length and mask: beyond dynamo's default limit (8) it would fall back
    # to eager FlexAttention, which materialises the scores (16 GiB at 16k)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows = []
    for length in lengths:
        for mask in ("causal", "shared-prefix"):
            for row in bench_one(length, mask, args.repeats, device, dtype):
                row.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           dtype=str(dtype).removeprefix("torch."), heads=HEADS, head_dim=HEAD_DIM,
                           torch=torch.__version__)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    note = plot(rows, plot_path) if plot_path else "no --plot or --json path: no plot"
    print(f"\n{'length':>6} {'mask':<14} {'method':<11} {'fwd ms':>8} {'fwd+bwd ms':>10} {'TFLOP/s':>8} "
          f"{'out err':>8} {'grad err':>8}")
    for r in rows:
        fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.3f}"
        tf = "-" if r["fwd_bwd_tflops"] is None else f"{r['fwd_bwd_tflops']:.1f}"
        ge = "-" if "grad_max_abs_err" not in r else f"{r['grad_max_abs_err']:.1e}"
        print(f"{r['length']:>6} {r['mask']:<14} {r['method']:<11} {r['fwd_ms']:>8.3f} {fb:>10} {tf:>8} "
              f"{r['out_max_abs_err']:>8.1e} {ge:>8}")
    print("errors: max abs vs the dense path in fp32; TFLOP/s over the allowed pairs, backward = 2.5x forward")
    if note:
        print(f"note: {note}")
    elif plot_path:
        print(f"plot: {plot_path}")
    return 0
