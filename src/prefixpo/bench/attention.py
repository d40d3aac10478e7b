"""``prefixpo bench --attention``: one attention call, FlexAttention against FlashAttention-2
varlen and SDPA, by length, forward and forward+backward, time and memory.

Masks (True means q may attend to k), over one row of ``T`` tokens:

    causal          one sequence, causal
    packed-causal   documents of ``min(T, GROUP)`` tokens (2048) packed in the row, causal within each
    shared-prefix   groups of ``min(T, GROUP)`` tokens, each a prompt of half the group and two
                    responses of a quarter (prefixpo's rule: a response sees its prompt and itself)

Methods:

    flex         compiled FlexAttention with a BlockMask (empty blocks skipped), ``[1, H, T, D]``
    varlen       FlashAttention-2 varlen (``torch.nn.attention.varlen.varlen_attn``), ``[T', H, D]``
                 with cumulative sequence lengths: the row itself (causal), its documents
                 (packed-causal), or, for shared-prefix, every response as its own sequence with a
                 copy of its prompt, the way a trainer without prefix sharing lays a group out
                 (``T' = 1.5 T`` here)
    sdpa-flash   SDPA FlashAttention, ``is_causal=True`` (causal mask only)
    sdpa-dense   SDPA with the dense boolean mask ``[T, T]``

Batch 1, 16 heads, head dim 64, bf16 on CUDA. Each method is checked first against the dense path
in fp32 on the row's own tokens (varlen's copies mapped back: a prompt token's output from its
first copy, its gradients the sum over its copies), max abs error of the output and of dq, dk, dv.
Then, on the method's own inputs, CUDA-event medians of ``--repeats`` forwards and forward+backwards
after warm-up, and the peak memory a forward+backward allocates above its inputs. TFLOP/s counts
the useful work only, QK^T and PV over the mask's allowed pairs (varlen's duplicated prompt is
extra work, not extra FLOPs). On CPU it runs as a smoke test (fp32, flex forward only: FlexAttention
has no CPU backward; varlen is CUDA-only, so its CPU rows run the same layout through SDPA one
sequence at a time, which checks the layout, not the kernel).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prefixpo.masks import prefix_mask_mod

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch without it: no varlen rows
    varlen_attn = None

HEADS, HEAD_DIM = 16, 64
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
GROUP = 2048  # tokens per document or group of the packed masks (the CPU test makes it small)
MASKS = ("causal", "packed-causal", "shared-prefix")
COLORS = {"flex": "tab:blue", "varlen": "tab:orange", "sdpa-flash": "tab:green", "sdpa-dense": "tab:red"}


def shared_prefix_layout(length: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``document_ids``, ``segment_ids``, ``position_ids`` ``[1, T]`` of groups of ``min(T, GROUP)``
    tokens (prompt 1/2, two responses 1/4 each); a short tail is one more group.

    >>> doc, seg, pos = shared_prefix_layout(8, "cpu")
    >>> seg.tolist(), pos.tolist()
    ([[0, 0, 0, 0, 1, 1, 2, 2]], [[0, 1, 2, 3, 4, 5, 4, 5]])
    """
    group = min(length, GROUP)
    doc, seg, pos = [], [], []
    for start in range(0, length, group):
        n = min(group, length - start)
        p, r = n - 2 * (n // 4), n // 4
        doc += [start // group] * n
        seg += [0] * p + [1] * r + [2] * r
        pos += list(range(p)) + list(range(p, p + r)) * 2
    return tuple(torch.tensor([x], device=device) for x in (doc, seg, pos))  # type: ignore[return-value]


def packed_layout(length: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same documents as ``shared_prefix_layout``, each one causal sequence (no responses)."""
    doc, _, _ = shared_prefix_layout(length, device)
    starts = torch.searchsorted(doc[0], doc[0], right=False)
    return doc, torch.zeros_like(doc), (torch.arange(length, device=doc.device) - starts)[None]


def mask_mod_for(mask: str, length: int, device: torch.device | str) -> Callable:
    """The ``mask_mod`` (FlexAttention's predicate) of ``mask``: causal, or prefixpo's rule over
    the packed or shared-prefix layout."""
    if mask == "causal":
        return lambda b, h, q, k: k <= q
    return prefix_mask_mod(*(packed_layout if mask == "packed-causal" else shared_prefix_layout)(length, device))


def varlen_layout(mask: str, length: int) -> tuple[list[int], list[int], list[int]]:
    """varlen's sequences for ``mask``: ``gather`` (the row position of each varlen token),
    ``lengths`` (its sequences, in order) and ``first`` (the varlen index of each row position's
    first copy).

    >>> varlen_layout("shared-prefix", 8)
    ([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 7], [6, 6], [0, 1, 2, 3, 4, 5, 10, 11])
    >>> import prefixpo.bench.attention as attention
    >>> attention.GROUP = 4  # a 6-token row: a group of 4, then a 2-token prompt without responses
    >>> varlen_layout("shared-prefix", 6)
    ([0, 1, 2, 0, 1, 3, 4, 5], [3, 3, 2], [0, 1, 2, 5, 6, 7])
    >>> attention.GROUP = 2048
    """
    if mask == "causal":
        return list(range(length)), [length], list(range(length))
    doc, seg, _ = shared_prefix_layout(length, "cpu")
    doc, seg = doc[0].tolist(), seg[0].tolist()
    gather: list[int] = []
    lengths: list[int] = []
    for d in sorted(set(doc)):
        where = [i for i, x in enumerate(doc) if x == d]
        if mask == "packed-causal":
            gather += where
            lengths.append(len(where))
            continue
        prompt = [i for i in where if seg[i] == 0]
        for s in sorted({seg[i] for i in where} - {0}) or [None]:  # a tail group may be a prompt alone
            sequence = prompt + [i for i in where if s is not None and seg[i] == s]
            gather += sequence
            lengths.append(len(sequence))
    assert sorted(set(gather)) == list(range(length)), "every token of the row is in some sequence"
    first = [0] * length
    for j in reversed(range(len(gather))):
        first[gather[j]] = j
    return gather, lengths, first


@dataclass
class Method:
    """An attention method: ``run`` on its own inputs; ``prepare`` makes them from ``[1, H, T, D]``
    q, k, v and ``restore`` maps its output back (both differentiable, used for the check)."""

    run: Callable[..., torch.Tensor]
    prepare: Callable[..., tuple[torch.Tensor, ...]] = field(default=lambda q, k, v: (q, k, v))
    restore: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out)
    kernel: str = ""


def sequence_sdpa(cu: torch.Tensor) -> Callable[..., torch.Tensor]:
    """varlen's CPU stand-in: causal SDPA over each ``[T', H, D]`` sequence of ``cu`` in turn."""
    bounds = cu.tolist()

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True)
                for a, b in zip(bounds, bounds[1:])]
        return torch.cat([o.transpose(0, 1) for o in outs])
    return run


def varlen_method(mask: str, length: int, device: torch.device) -> Method:
    """FlashAttention-2 varlen over ``varlen_layout``'s sequences (CUDA), or its CPU stand-in."""
    gather, lengths, first = varlen_layout(mask, length)
    gather_t, first_t = (torch.tensor(x, device=device) for x in (gather, first))
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    longest = max(lengths)
    if device.type == "cuda":
        # torch 2.10's varlen_attn takes is_causal; later ones a window, (-1, 0) being causal
        causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters \
            else {"is_causal": True}

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return varlen_attn(q, k, v, cu, cu, longest, longest, **causal)
        kernel = "FlashAttention-2 varlen"
    else:
        run, kernel = sequence_sdpa(cu), "SDPA per sequence (CPU stand-in)"
    return Method(run, prepare=lambda q, k, v: tuple(x[0].transpose(0, 1)[gather_t] for x in (q, k, v)),
                  restore=lambda out: out[first_t].transpose(0, 1)[None], kernel=kernel)


def methods(mask: str, mask_mod: Callable, length: int,
            device: torch.device) -> tuple[dict[str, Method], torch.Tensor]:
    """``name -> Method`` for the methods that support ``mask`` here, and the dense boolean mask."""
    block_mask = create_block_mask(mask_mod, 1, None, length, length, device=device)
    dense = mask_mod(torch.zeros((), dtype=torch.long, device=device), None,
                     torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :])
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    out = {"flex": Method(lambda q, k, v: flex(q, k, v, block_mask=block_mask), kernel="FlexAttention"),
           "sdpa-dense": Method(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                                kernel="SDPA, dense mask")}
    if device.type != "cuda" or varlen_attn is not None:
        out["varlen"] = varlen_method(mask, length, device)
    if mask == "causal":
        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if device.type != "cuda":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out["sdpa-flash"] = Method(flash, kernel="SDPA FlashAttention")
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


def peak_mib(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
             device: torch.device) -> float | None:
    """MiB a forward+backward allocates at its peak above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*inputs).backward(grad_out)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def check(method: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
          reference: tuple[torch.Tensor, list[torch.Tensor]], with_backward: bool) -> dict[str, float]:
    """Max abs errors of the output (and dq, dk, dv) on the row's own tokens, against the fp32 dense path."""
    inputs = [x.detach().requires_grad_(with_backward) for x in (q, k, v)]
    out = method.restore(method.run(*method.prepare(*inputs)))
    err = {"out_max_abs_err": (out.float() - reference[0]).abs().max().item()}
    if with_backward:
        out.backward(grad_out)
        err["grad_max_abs_err"] = max((x.grad.float() - g).abs().max().item() for x, g in zip(inputs, reference[1]))
    return err


def bench_one(length: int, mask: str, repeats: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Check every method of ``mask`` at ``length`` against the dense path in fp32, then time it."""
    gen = torch.Generator(device=device).manual_seed(length)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v, grad_out = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    attend, dense = methods(mask, mask_mod_for(mask, length, device), length, device)
    pairs = int(dense.sum())
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]  # the oracle: the dense path in fp32
    ref_out = F.scaled_dot_product_attention(*ref_in, attn_mask=dense)
    ref_out.backward(grad_out.float())
    reference = (ref_out.detach(), [x.grad for x in ref_in])
    timer = _timer(device)
    rows = []
    for name, method in attend.items():
        with_backward = not (name == "flex" and device.type == "cpu")
        err = check(method, q, k, v, grad_out, reference, with_backward)
        own = [x.detach().requires_grad_(with_backward) for x in method.prepare(q, k, v)]
        own_grad = torch.randn_like(method.run(*own), generator=gen) if with_backward else None
        fwd, fwd_bwd = time_method(method.run, own, own_grad, with_backward, repeats, timer)
        flops = 4 * HEADS * HEAD_DIM * pairs  # QK^T and PV over the allowed pairs
        rows.append({"length": length, "mask": mask, "method": name, "kernel": method.kernel,
                     "tokens": own[0].shape[-2] if own[0].dim() == 4 else own[0].shape[0],
                     "allowed_pairs": pairs, "density": pairs / length**2, "fwd_ms": 1e3 * fwd,
                     "fwd_bwd_ms": fwd_bwd and 1e3 * fwd_bwd,
                     "fwd_bwd_peak_mib": peak_mib(method.run, own, own_grad, device) if with_backward else None,
                     "fwd_tflops": flops / fwd / 1e12,
                     # backward = 2.5x forward (FlashAttention's convention: recompute + 4 matmuls)
                     "fwd_bwd_tflops": fwd_bwd and 3.5 * flops / fwd_bwd / 1e12, **err})
    return rows


def plot(rows: list[dict], path: str) -> str | None:
    """Forward and forward+backward ms by length, one column per mask, to ``path``; a note if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    device = rows[0]["device"] if rows else ""
    fig, axes = plt.subplots(2, len(MASKS), figsize=(15, 8), sharex=True)
    for col, mask in enumerate(MASKS):
        for row, (key, what) in enumerate((("fwd_ms", "forward"), ("fwd_bwd_ms", "forward+backward"))):
            ax = axes[row][col]
            for method, color in COLORS.items():
                pts = [(r["length"], r[key]) for r in rows if r["mask"] == mask and r["method"] == method and r[key]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, color=color)
            ax.set(xscale="log", yscale="log", title=f"{mask}: {what}")
            if row == 1:
                ax.set_xlabel("tokens in the row")
            if col == 0:
                ax.set_ylabel("ms per call (median)")
            ax.legend(fontsize=8)
    fig.suptitle(f"One attention call, batch 1, {HEADS} heads x {HEAD_DIM}, {device}: lower is faster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'length':>6} {'mask':<14} {'method':<11} {'tokens':>6} {'fwd ms':>8} {'fwd+bwd ms':>10} "
          f"{'MiB':>7} {'TFLOP/s':>8} {'out err':>8} {'grad err':>8}")
    for r in rows:
        fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.3f}"
        tf = "-" if r["fwd_bwd_tflops"] is None else f"{r['fwd_bwd_tflops']:.1f}"
        mib = "-" if r["fwd_bwd_peak_mib"] is None else f"{r['fwd_bwd_peak_mib']:.0f}"
        ge = "-" if "grad_max_abs_err" not in r else f"{r['grad_max_abs_err']:.1e}"
        print(f"{r['length']:>6} {r['mask']:<14} {r['method']:<11} {r['tokens']:>6} {r['fwd_ms']:>8.3f} {fb:>10} "
              f"{mib:>7} {tf:>8} {r['out_max_abs_err']:>8.1e} {ge:>8}")
    print("errors: max abs vs the dense path in fp32; TFLOP/s over the allowed pairs, backward = 2.5x forward; "
          "MiB: peak allocation of a forward+backward above its inputs")


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
        for mask in MASKS:
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
    print_table(rows)
    if note:
        print(f"note: {note}")
    elif plot_path:
        print(f"plot: {plot_path}")
    return 0
