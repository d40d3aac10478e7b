"""``prefixpo verify``: check on a given model that the shared layout equals separate sequences.

It draws random groups, computes every response's summed log-prob and the gradient of a
DPO-style loss twice -- once the standard way (each prompt+response its own sequence, the
model's own forward and logits) and once through prefixpo (one shared sequence per group) --
and compares them. Exit 0 within tolerance, 1 beyond it, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefixpo.layout import Group, round_up
from prefixpo.modeling import DTYPES, UnsupportedModelError, apply_prefix_attention, compute_logps, load_model
from prefixpo.oracle import TOLERANCES, random_groups, separate_logps
from prefixpo.packing import batch_rows, pack
from prefixpo.sources import SourceError, check_model


def shared_logps(model: nn.Module, groups: Sequence[Group], chunk_size: int = 64,
                 packing_capacity: int | None = None) -> list[torch.Tensor]:
    """The same per-token log-probs through prefixpo's shared layout (model already switched),
    one group per row, or packed into rows of ``packing_capacity`` tokens."""
    if packing_capacity is None:
        rows = [[i] for i in range(len(groups))]
    else:
        rows = pack([g.num_tokens for g in groups], packing_capacity, seed=0)
    batch = batch_rows(groups, rows, buckets=[packing_capacity] if packing_capacity else None)
    out = compute_logps(model, batch.to(next(model.parameters()).device), chunk_size=chunk_size)
    per_response = iter(out.token_logps.split(batch.response_lengths.tolist()))
    by_group = {i: [next(per_response) for _ in groups[i].response_ids] for row in rows for i in row}
    return [t for i in range(len(groups)) for t in by_group[i]]


def verification_loss(groups: Sequence[Group], token_logps: Sequence[torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """A DPO-style loss touching every response: response 0 preferred to each sibling; NLL for n = 1."""
    sums = iter([t.sum() for t in token_logps])
    loss = torch.zeros((), device=token_logps[0].device)
    for g in groups:
        per_group = [next(sums) for _ in g.response_ids]
        if len(per_group) == 1:
            loss = loss - per_group[0] / len(g.response_ids[0])
        for other in per_group[1:]:
            loss = loss - F.logsigmoid(beta * (per_group[0] - other))
    return loss


@dataclass
class Comparison:
    logps_separate: list[float]
    logps_shared: list[float]
    token_counts: list[int]
    max_abs_logps: float
    max_abs_logps_per_token: float
    max_rel_grads: float | None  # None when no gradient was compared

    def within(self, dtype: torch.dtype) -> bool:
        tol = TOLERANCES[dtype]
        diffs = [abs(a - b) for a, b in zip(self.logps_separate, self.logps_shared)]
        ok = all(d <= max(tol.get("logps", 0.0), tol["logps_per_token"] * n)
                 for d, n in zip(diffs, self.token_counts))
        return ok and (self.max_rel_grads is None or self.max_rel_grads <= tol["grads"])


def _run(model: nn.Module, groups: Sequence[Group], logps_fn: Callable, with_grads: bool, per_group: bool):
    """Token log-probs and loss gradients; ``per_group`` runs one group at a time (the loss is a
    sum over groups, so the gradients are the same and the memory is one group's)."""
    model.zero_grad(set_to_none=True)
    token_logps: list[torch.Tensor] = []
    for part in ([[g] for g in groups] if per_group else [groups]):
        with torch.set_grad_enabled(with_grads):
            part_logps = logps_fn(model, part)
            if with_grads:
                verification_loss(part, part_logps).backward()
        token_logps += [t.detach() for t in part_logps]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return token_logps, grads


def compare(model: nn.Module, groups: Sequence[Group], backend: str, with_grads: bool = True,
            chunk_size: int = 64, check_architecture: bool = True,
            packing_capacity: int | None = None) -> Comparison:
    """Run both paths on ``model`` (stock attention in, prefix attention out) and compare."""
    model.eval()  # no dropout: both paths must see the same function
    sep, sep_grads = _run(model, groups, separate_logps, with_grads, per_group=True)
    apply_prefix_attention(model, backend, self_check=check_architecture)
    shr, shr_grads = _run(model, groups, lambda m, g: shared_logps(m, g, chunk_size, packing_capacity), with_grads, per_group=False)
    # sums in float64, so the comparison sees the tokens' differences and not the summation order
    sep_sums = [t.double().sum().item() for t in sep]
    shr_sums = [t.double().sum().item() for t in shr]
    diffs = [abs(a - b) for a, b in zip(sep_sums, shr_sums)]
    rel = None
    if with_grads:
        rel = 0.0
        for name, ref in sep_grads.items():
            got = shr_grads.get(name, torch.zeros_like(ref))
            scale = ref.abs().max().item()
            rel = max(rel, (got - ref).abs().max().item() / scale if scale > 0 else (got - ref).abs().max().item())
    return Comparison(
        logps_separate=sep_sums,
        logps_shared=shr_sums,
        token_counts=[len(t) for t in sep],
        max_abs_logps=max(diffs),
        max_abs_logps_per_token=max(d / len(t) for d, t in zip(diffs, sep)),
        max_rel_grads=rel,
    )


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="hub name, local model directory, or a config JSON (random weights)")
    parser.add_argument("--num-responses", type=int, default=2, help="responses per group (default 2)")
    parser.add_argument("--num-groups", type=int, default=4, help="random groups to check (default 4)")
    parser.add_argument("--backend", choices=["sdpa", "flex"], default=None,
                        help="attention backend (default: flex on cuda, sdpa on cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-length", type=int, default=150)
    parser.add_argument("--max-response-length", type=int, default=140)
    parser.add_argument("--logps-chunk-size", type=int, default=64)
    parser.add_argument("--no-grads", action="store_true", help="compare log-probs only")
    parser.add_argument("--packing", action="store_true",
                        help="pack several groups per row (the packed path) instead of one group per row")
    parser.add_argument("--packing-capacity", type=int, default=None,
                        help="row capacity with --packing (default: room for about three groups, a multiple of 128)")
    parser.add_argument("--json", metavar="PATH", help="also write the groups and results as JSON")
    parser.add_argument("--oracle-attention", choices=["eager", "sdpa"], default="eager",
                        help="transformers attention for the separate-sequence side (sdpa needs less memory)")
    parser.add_argument("--trust-remote-code", action="store_true")


def _bad_arguments(message: str) -> int:
    print(f"prefixpo verify: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:

    if args.num_responses < 1 or args.num_groups < 1:
        return _bad_arguments("--num-responses and --num-groups must be at least 1")
    if args.max_prompt_length < 1 or args.max_response_length < 1 or args.logps_chunk_size < 1:
        return _bad_arguments("lengths and --logps-chunk-size must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _bad_arguments("--device cuda asked for, but no CUDA device is available")
    backend = args.backend or ("flex" if args.device == "cuda" else "sdpa")
    with_grads = not args.no_grads
    if backend == "flex" and args.device == "cpu" and with_grads:
        print("note: FlexAttention has no backward pass on CPU; comparing log-probs only", file=sys.stderr)
        with_grads = False
    try:
        check_model(args.model, "--model", config_file=True)
    except SourceError as err:
        return _bad_arguments(str(err))
    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                           trust_remote_code=args.trust_remote_code, attn_implementation=args.oracle_attention)
    except (OSError, ValueError) as err:
        return _bad_arguments(f"cannot load model {args.model!r}: {err}")
    vocab = model.get_output_embeddings().weight.shape[0]
    groups = random_groups(vocab, args.num_groups, args.num_responses, args.seed,
                           args.max_prompt_length, args.max_response_length)
    capacity = None
    if args.packing:
        longest = max(g.num_tokens for g in groups)
        capacity = args.packing_capacity or round_up(3 * longest, 128)
        if capacity % 128 or capacity < longest:
            return _bad_arguments(f"--packing-capacity must be a multiple of 128 of at least {longest} "
                                  "(the longest group)")
    elif args.packing_capacity is not None:
        return _bad_arguments("--packing-capacity needs --packing")
    try:
        result = compare(model, groups, backend, with_grads, args.logps_chunk_size, packing_capacity=capacity)
    except UnsupportedModelError as err:
        return _bad_arguments(str(err))
    dtype = DTYPES[args.dtype]
    ok = result.within(dtype)
    _print_table(args, backend, groups, result, dtype)
    grads = "n/a" if result.max_rel_grads is None else f"{result.max_rel_grads:.3e}"
    print(f"max_abs_diff logps={result.max_abs_logps:.3e} grads={grads}")
    if args.json:
        _write_json(args.json, groups, result, backend, args)
    return 0 if ok else 1


def _print_table(args, backend, groups, result: Comparison, dtype) -> None:
    packing = f" packing={args.packing_capacity or 'auto'}" if args.packing else ""
    print(f"model={args.model} backend={backend} dtype={args.dtype} device={args.device} seed={args.seed}{packing}")
    print(f"{'group':>5} {'resp':>4} {'prompt':>6} {'tokens':>6} {'logp separate':>15} {'logp shared':>15} {'abs diff':>10}")
    k = 0
    for gi, g in enumerate(groups):
        for ri in range(len(g.response_ids)):
            a, b = result.logps_separate[k], result.logps_shared[k]
            print(f"{gi:>5} {ri:>4} {len(g.prompt_ids):>6} {result.token_counts[k]:>6} {a:>15.6f} {b:>15.6f} "
                  f"{abs(a - b):>10.2e}")
            k += 1
    tol = TOLERANCES[dtype]
    print("tolerance: " + ", ".join(f"{k}<={v:g}" for k, v in tol.items()) + " (sums: the larger bound)" +
          f"  -> {'PASS' if result.within(dtype) else 'FAIL'}")


def _write_json(path: str, groups, result: Comparison, backend: str, args) -> None:
    it_sep, it_shr = iter(result.logps_separate), iter(result.logps_shared)
    payload = {
        "model": args.model, "backend": backend, "dtype": args.dtype, "device": args.device, "seed": args.seed,
        "groups": [{
            "prompt_ids": list(g.prompt_ids),
            "response_ids": [list(r) for r in g.response_ids],
            "logps_shared": [next(it_shr) for _ in g.response_ids],
            "logps_separate": [next(it_sep) for _ in g.response_ids],
        } for g in groups],
        "max_abs_diff": {"logps": result.max_abs_logps,
                         "grads": None if result.max_rel_grads is None or math.isnan(result.max_rel_grads)
                         else result.max_rel_grads},
    }
    with open(path, "w") as f:
        json.dump(payload, f)
