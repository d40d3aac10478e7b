"""``prefixpo bench``: time real preference-training steps in four layouts of the SAME pairs.

Every step draws its groups (one prompt, a chosen and a rejected response) first; each mode then
lays the same pairs out its own way (``layouts``, ``baseline``; docs/benchmarks.md)::

    separate         TRL's DPO: chosen and rejected rows stacked, right-padded, transformers' sdpa
                     with a 2-D padding mask, full logits -> log_softmax -> gather
    separate-packed  every prompt+response its own single-response group, packed (document mask)
    shared           prefix sharing, one group per row, rows padded to a bucket (multiple of 128)
    shared-packed    prefix sharing and packing into rows of ``--capacity`` tokens, bucketed

``harness`` times each mode; ``--attention`` runs the attention microbenchmark (``attention``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
import transformers
from torch import nn
from torch._dynamo import config as dynamo_config

from prefixpo.bench.attention import run_attention
from prefixpo.bench.harness import BenchSettings, run_mode
from prefixpo.bench.layouts import MODES, default_pairs_per_step, fit_both_layouts
from prefixpo.bench.models import build_models, model_config
from prefixpo.bench.profiles import load_profiles, sample_groups
from prefixpo.layout import Group
from prefixpo.metrics import model_dims, peak_flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="all", help="a profile of the profiles file, or 'all' (default)")
    parser.add_argument("--model", default="llama-1b",
                        help="a key of the profiles file's models (default llama-1b) or a config JSON path")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode (default 3)")
    parser.add_argument("--capacity", type=int, default=8192, help="tokens per packed row (default 8192)")
    parser.add_argument("--rows-per-step", type=int, default=4,
                        help="default pairs per step: the groups that fill this many packed rows on average, "
                             "a multiple of --micro-pairs (default 4)")
    parser.add_argument("--pairs-per-step", type=int, default=None, help="pairs per optimizer step (overrides "
                        "--rows-per-step)")
    parser.add_argument("--micro-pairs", type=int, default=4,
                        help="pairs per micro-batch of the unpacked modes (default 4, TRL's batch: docs/benchmarks.md 'The peer')")
    parser.add_argument("--num-buckets", type=int, default=4, help="packed row lengths (default 4)")
    parser.add_argument("--num-examples", type=int, default=512, help="groups sampled per profile (default 512)")
    parser.add_argument("--profiles", default=None,
                        help="a profiles JSON file (default $PREFIXPO_BENCH_PROFILES, else the profiles.json shipped with prefixpo)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--backend", choices=["auto", "flex", "sdpa"], default="auto",
                        help="prefixpo attention of the non-separate modes (auto: flex on cuda, sdpa on cpu)")
    parser.add_argument("--compile-model", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile every decoder layer in the packed modes (default: on for cuda; "
                             "`separate`, TRL's recipe, and unpacked `shared` always run eager)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="data-parallel rank counts for which to report the waiting of the other ranks for "
                             "the slowest, from measured micro-batch times (default 2 4)")
    parser.add_argument("--cudnn-sdpa", action="store_true",
                        help="leave cuDNN SDPA on (off by default: it is slower on changing padded shapes: docs/benchmarks.md 'The peer')")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU (default: 989 dense bf16 on H100/H200 SXM; none elsewhere)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; start no new profile x mode after this (the rest is reported as skipped)")
    parser.add_argument("--json", metavar="OUT", help="write one JSON line per mode (appended as they finish)")
    parser.add_argument("--table-from", metavar="JSONL", help="only print the table of an earlier --json file")
    parser.add_argument("--attention", action="store_true",
                        help="run the attention microbenchmark instead (see prefixpo.bench.attention)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="--attention: total lengths (default 1024 2048 4096 8192 16384)")
    parser.add_argument("--repeats", type=int, default=10, help="--attention: timed repeats (median)")
    parser.add_argument("--plot", default=None, help="--attention: PNG path (default next to --json)")


def too_big_for_memory(name: str, config: Any) -> str | None:
    """Why the step benchmark of ``config`` cannot run in this machine's memory on the CPU (fp32:
    weights, gradients and Adam's two moments of the policy, and the reference's weights, 20 bytes
    a parameter), or None. Counted on the meta device, without allocating."""
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with contextlib.suppress(OSError):  # a container's limit (cgroup v2), where it is lower
            limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
            have = min(have, int(limit)) if limit.isdigit() else have
    except Exception:  # a model the meta device cannot build, a system without sysconf: no check
        return None
    need = 20 * params
    if need <= 0.8 * have:
        return None
    return (f"{name} has {params / 1e9:.1f}B parameters: on the CPU its benchmark needs about {need / 2**30:.0f} GiB "
            f"(fp32 weights, gradients, Adam and the reference), and this machine has {have / 2**30:.0f} GiB; run it "
            "on a GPU, or pass a small model (--model examples/configs/tiny-llama.json)")


def _error(message: str) -> int:
    print(f"prefixpo bench: error: {message}", file=sys.stderr)
    return 2


def _fmt(x: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The result rows (JSON lines of ``--json``) as the table printed at the end of a run."""
    head = (f"{'profile':<16} {'mode':<16} {'pairs/s':>8} {'tok/s':>8} {'pad%':>5} {'MFU%':>5} {'GiB':>6} "
            f"{'mask ms':>7} {'mask%':>5} {'recomp':>6} {'idle%':>5} {'x sep':>6} {'x sep-pk':>8} {'ideal':>6}")
    lines = [head]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['profile']:<16} {r['mode']:<16} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['profile']:<16} {r['mode']:<16} {r['pairs_per_s']:>8.2f} {r['tokens_per_s']:>8.0f} "
            f"{100 * r['padding_fraction']:>5.1f} {_fmt(r['mfu'] and 100 * r['mfu'], 5, 1)} "
            f"{_fmt(r['peak_gib'], 6, 1)} {_fmt(r['mask_build_ms_per_step'], 7, 2)} "
            f"{_fmt(r['mask_build_pct_of_step'], 5, 2)} {r['recompiles_after_warmup']:>6} "
            f"{_fmt(next(iter((r.get('rank_idle_pct') or {}).values()), None), 5, 1)} "
            f"{_fmt(r['vs_separate'], 6, 2)} {_fmt(r['vs_separate_packed'], 8, 2)} "
            f"{r['ideal_token_ratio']:>6.3f}")
    return "\n".join(lines)


def _environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device.type}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the step benchmark's numeric arguments, or None."""
    if (args.steps < 1 or args.warmup < 0 or args.micro_pairs < 1 or args.num_examples < 1
            or args.rows_per_step < 1 or min(args.ranks) < 1):
        return "--steps, --micro-pairs, --rows-per-step and --ranks must be at least 1, --warmup at least 0"
    if args.capacity < 128 or args.capacity % 128:
        return f"--capacity must be a positive multiple of 128, got {args.capacity}"
    return None


def configure_torch(device: torch.device, cudnn_sdpa: bool) -> None:
    """Let compiled code keep every row shape of many profiles; cuDNN SDPA off on CUDA unless asked
    for (it is slow on changing padded shapes: docs/benchmarks.md 'The peer')."""
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 1024)
    for knob in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 8192)
    if device.type == "cuda" and not cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)


def profile_steps(profiles: dict[str, Any], name: str, vocab: int,
                  args: argparse.Namespace) -> tuple[list[list[Group]], float]:
    """The groups of every step (warm-up steps first) of profile ``name``, and the ideal token
    ratio of the pairs used (separate-sequence tokens / shared tokens)."""
    groups = sample_groups(profiles, name, vocab, num_examples=args.num_examples, seed=args.seed)
    groups = [fit_both_layouts(g, args.capacity) for g in groups]
    per_step = args.pairs_per_step or default_pairs_per_step(groups, args.rows_per_step * args.capacity,
                                                             args.micro_pairs)
    needed = per_step * (args.warmup + args.steps)
    if needed > len(groups):
        more = sample_groups(profiles, name, vocab, num_examples=needed, seed=args.seed)
        groups = [fit_both_layouts(g, args.capacity) for g in more]
    steps = [groups[s * per_step:(s + 1) * per_step] for s in range(args.warmup + args.steps)]
    used = [g for s in steps for g in s]
    return steps, sum(g.num_separate_tokens for g in used) / sum(g.num_tokens for g in used)


def bench_profile(name: str, args: argparse.Namespace, models: tuple[nn.Module, nn.Module], settings: BenchSettings,
                  steps: list[list[Group]], ideal: float, info: dict[str, Any], deadline: float | None,
                  out: IO[str] | None) -> list[dict[str, Any]]:
    """Every mode of ``args.modes`` on one profile's steps; each result row printed (and written to
    ``out``) as it finishes. ``info``: the run's ``env`` and ``dtype``, copied into every row. A
    mode that would start after ``deadline`` (``perf_counter`` seconds) is reported as skipped."""
    device = next(models[0].parameters()).device
    rows: list[dict[str, Any]] = []
    by_mode: dict[str, dict] = {}
    for mode in args.modes:
        row: dict[str, Any] = {"profile": name, "model": args.model}
        if deadline is not None and time.perf_counter() > deadline:
            row.update(mode=mode, skipped=f"time budget of {args.time_budget:.0f} s spent")
        else:
            row.update(run_mode(mode, *models, steps, args.warmup, settings))
            by_mode[mode] = row
            for base, key in (("separate", "vs_separate"), ("separate-packed", "vs_separate_packed")):
                row[key] = row["pairs_per_s"] / by_mode[base]["pairs_per_s"] if base in by_mode else None
            row["ideal_token_ratio"] = ideal
            row.update(env=info["env"], backend=settings.backend if mode != "separate" else "transformers-sdpa",
                       dtype=info["dtype"], capacity=settings.capacity, micro_pairs=settings.micro_pairs,
                       peak_tflops=settings.peak_flops and settings.peak_flops / 1e12)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_steps(args: argparse.Namespace, device: torch.device, profiles: dict[str, Any], config: Any,
                names: Sequence[str]) -> int:
    """The step benchmark of profiles ``names``: a header JSON line, one JSON line per profile x
    mode, then the table; 1 if a loss was NaN."""
    backend = args.backend if args.backend != "auto" else ("flex" if device.type == "cuda" else "sdpa")
    t_start = time.perf_counter()
    configure_torch(device, args.cudnn_sdpa)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = build_models(config, device, dtype, args.seed)
    peak = peak_flops(device, args.peak_tflops)
    dims = model_dims(models[0])
    settings = BenchSettings(
        backend=backend, capacity=args.capacity, micro_pairs=args.micro_pairs, num_buckets=args.num_buckets,
        seed=args.seed, lr=args.lr, dims=dims, peak_flops=peak, ranks=args.ranks,
        compile_model=args.compile_model if args.compile_model is not None else device.type == "cuda")
    info = {"env": _environment(device), "dtype": str(dtype).removeprefix("torch.")}
    print(json.dumps({"env": info["env"], "model": args.model, "dims": dims, "backend": backend,
                      "peak_tflops": peak and peak / 1e12, "args": {
                          k: v for k, v in vars(args).items() if not k.startswith("_")}}), flush=True)
    deadline = t_start + args.time_budget if args.time_budget is not None else None
    rows = []
    with open(args.json, "a") if args.json else contextlib.nullcontext() as out:
        for name in names:
            steps, ideal = profile_steps(profiles, name, dims["vocab"], args)
            rows += bench_profile(name, args, models, settings, steps, ideal, info, deadline, out)
    print()
    print(format_table(rows))
    if peak:
        print(f"MFU over {peak / 1e12:.0f} TFLOP/s dense bf16; tokens exclude padding; "
              f"ideal = separate-sequence tokens / shared tokens of the sampled pairs; idle% = waiting "
              f"of the other ranks for the slowest at {args.ranks[0]} data-parallel ranks")
    return 0 if all(not math.isnan(x) for r in rows for x in r.get("losses", [])) else 1


def run(args: argparse.Namespace) -> int:
    """``prefixpo bench``: the table of an earlier run (``--table-from``), the attention
    microbenchmark (``--attention``), or the step benchmark."""
    if args.table_from:
        with open(args.table_from) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(format_table([r for r in rows if "mode" in r]))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda asked for, but no CUDA device is available")
    if args.attention:
        return run_attention(args, device)
    problem = check_arguments(args)
    if problem:
        return _error(problem)
    try:
        profiles = load_profiles(args.profiles)
        config = model_config(args.model, profiles)
    except (OSError, ValueError) as err:
        return _error(str(err))
    if args.profile != "all" and args.profile not in profiles["profiles"]:
        return _error(f"unknown profile {args.profile!r}; the profiles are: {', '.join(profiles['profiles'])}")
    if device.type == "cpu" and (problem := too_big_for_memory(args.model, config)):
        return _error(problem)
    names = list(profiles["profiles"]) if args.profile == "all" else [args.profile]
    return bench_steps(args, device, profiles, config, names)
