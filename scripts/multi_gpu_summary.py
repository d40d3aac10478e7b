"""The results of scripts/gpu_multi_run.sh (docs/benchmarks.md "Several GPUs"): FSDP2 on one GPU
against several (``--gpus``, default 2), the same global batch. From the repository root:

    python scripts/multi_gpu_summary.py load DIR [DIR ...] --out from_pretrained.json
    python scripts/multi_gpu_summary.py summary --one RUN --multi RUN --resume RUN [--plain RUN] [--gpus N] --out OUT_DIR

``load``: each DIR with plain ``AutoModelForCausalLM.from_pretrained`` and one forward pass.
``summary``: from the runs' metrics.jsonl (one line per step): steady-state pairs/s of each run
(steps after ``--skip``, pairs over wall time), the scaling ratio, the per-step loss differences
(multi vs one, and resumed vs multi at the resumed steps), the ranks' imbalance, and the
throughput of a plain one-GPU run (no FSDP) when given; writes
multi_gpu_summary.json and loss_curves.png into OUT_DIR and prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

TITLE = "DPO on llama-1b, capybara profile"  # the loss plot's, of the published runs

# pass marks, stated with the numbers they judge
SCALING_SHARE = 0.9  # pairs/s on N GPUs over 1 GPU, per GPU: 1.8 on 2
RESUME_TOLERANCE = 1e-3  # |loss difference| of a resumed step: the same state, only kernel nondeterminism


def load_check(directories: list[str]) -> dict[str, Any]:
    """Plain ``from_pretrained`` of each directory and a forward pass on 16 tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {}
    for directory in directories:
        try:
            model = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
            ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits = model(input_ids=ids.to(device)).logits
            results[directory] = {"ok": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape),
                                  "dtype": str(next(model.parameters()).dtype),
                                  "params": sum(p.numel() for p in model.parameters())}
            del model
        except Exception as err:  # a failed load is the result to report, not a crash
            results[directory] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    return results


def train_records(run: Path) -> dict[int, dict[str, Any]]:
    """The train lines of a run's metrics.jsonl by step (empty when the run wrote none)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r.get("split") == "train"}


def throughput(records: dict[int, dict[str, Any]], skip: int) -> dict[str, float] | None:
    """Steady-state pairs/s: pairs over wall time of the steps after ``skip`` (compile, warm-up)."""
    steady = [r for s, r in sorted(records.items()) if s > skip]
    if not steady:
        return None
    seconds = sum(r["step_time_s"] for r in steady)
    pairs = sum(r["pairs"] for r in steady)
    return {"steps": len(steady), "pairs_per_s": pairs / seconds, "seconds": seconds, "pairs": pairs,
            "median_step_time_s": statistics.median(r["step_time_s"] for r in steady)}


def loss_differences(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-step |loss(a) - loss(b)| over the steps both logged."""
    steps = sorted(a.keys() & b.keys())
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps]
    if not steps:
        return {"steps": []}
    return {"steps": steps, "abs_diff": diffs, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "same_pairs_each_step": all(a[s].get("pairs") == b[s].get("pairs") for s in steps)}


def plot(one: dict, multi: dict, resume: dict, path: Path, gpus: int = 2,
         title: str = TITLE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for records, label, style in ((one, "FSDP2, 1 GPU", "-"), (multi, f"FSDP2, {gpus} GPUs", "--")):
        steps = sorted(records)
        top.plot(steps, [records[s]["loss"] for s in steps], style, label=label)
    if resume:
        steps = sorted(resume)
        top.plot(steps, [resume[s]["loss"] for s in steps], "o", mfc="none", label="FSDP2, resumed")
    top.set_ylabel("train loss (per step)")
    top.legend()
    top.set_title(f"{title}: same global batch on 1 and {gpus} GPUs")
    steps = sorted(one.keys() & multi.keys())
    bottom.plot(steps, [abs(one[s]["loss"] - multi[s]["loss"]) for s in steps], ".-")
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(one_dir: Path, multi_dir: Path, resume_dir: Path, out: Path, skip: int,
            loaded: Path | None, plain_dir: Path | None = None, resume2_dir: Path | None = None,
            gpus: int = 2, title: str = TITLE) -> dict[str, Any]:
    one, multi, resume = train_records(one_dir), train_records(multi_dir), train_records(resume_dir)
    plain = train_records(plain_dir) if plain_dir is not None else {}
    result: dict[str, Any] = {"steps_logged": {"one": len(one), "multi": len(multi), "resume": len(resume),
                                               "plain": len(plain)}}
    multi_key = f"fsdp_{gpus}_gpus"
    speeds = {"fsdp_1_gpu": throughput(one, skip), multi_key: throughput(multi, skip),
              "plain_1_gpu": throughput(plain, skip)}
    result["throughput"] = {**speeds, "skipped_steps": skip}
    target = round(SCALING_SHARE * gpus, 2)
    result["scaling"] = {"target": target}
    for base in ("fsdp_1_gpu", "plain_1_gpu"):
        if speeds[base] and speeds[multi_key]:
            ratio = speeds[multi_key]["pairs_per_s"] / speeds[base]["pairs_per_s"]
            result["scaling"][f"over_{base}"] = {"pairs_per_s_ratio": ratio, "met": ratio >= target}
    result["loss_one_vs_multi"] = loss_differences(one, multi)
    resumed = loss_differences(multi, resume)
    if resumed["steps"]:  # its first step runs the restored weights; later ones also the optimizer state
        first = resumed["abs_diff"][0]
        resumed.update(first_step_abs_diff=first, tolerance=RESUME_TOLERANCE, first_step_met=first <= RESUME_TOLERANCE)
    result["loss_resumed_vs_multi"] = resumed
    if resume2_dir is not None:  # two resumes of one state: the run-to-run drift of the GPU kernels
        result["loss_resumed_twice"] = loss_differences(resume, train_records(resume2_dir))
    steady = [r for s, r in sorted(multi.items()) if s > skip]
    if steady:
        result["ranks"] = {
            "slowest_rank_idle_mean": statistics.fmean(r["slowest_rank_idle"] for r in steady),
            "slowest_rank_idle_max": max(r["slowest_rank_idle"] for r in steady),
            "rank_token_imbalance_mean": statistics.fmean(r["rank_token_imbalance"] for r in steady),
            "rank_tokens_total": [sum(r["rank_tokens"][i] for r in steady) for i in range(len(steady[0]["rank_tokens"]))],
        }
    result["max_memory_gib"] = {name: max((r["max_memory_gib"] for r in recs.values() if "max_memory_gib" in r),
                                          default=None) for name, recs in (("one", one), ("multi", multi))}
    if loaded is not None and loaded.is_file():
        checks = json.loads(loaded.read_text())
        result["from_pretrained"] = {"ok": bool(checks) and all(c.get("ok") for c in checks.values()), **checks}
    if one and multi:
        plot(one, multi, resume, out / "loss_curves.png", gpus, title)
    (out / "multi_gpu_summary.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load")
    load.add_argument("dirs", nargs="+")
    load.add_argument("--out", required=True)
    summ = sub.add_parser("summary")
    for name in ("--one", "--multi", "--resume", "--out"):
        summ.add_argument(name, required=True)
    summ.add_argument("--plain", default=None, help="a plain one-GPU run (no FSDP), for its throughput")
    summ.add_argument("--resume2", default=None, help="a second run resumed from the same checkpoint")
    summ.add_argument("--skip", type=int, default=5)
    summ.add_argument("--gpus", type=int, default=2, help="GPUs of the --multi run (default 2)")
    summ.add_argument("--title", default=TITLE, help="the loss plot's title")
    summ.add_argument("--loaded", default=None, help="the JSON written by `load`")
    args = parser.parse_args()
    if args.command == "load":
        results = load_check(args.dirs)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(json.dumps(results))
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = summary(Path(args.one), Path(args.multi), Path(args.resume), out, args.skip,
                         Path(args.loaded) if args.loaded else None, Path(args.plain) if args.plain else None,
                         Path(args.resume2) if args.resume2 else None, args.gpus, args.title)
        lists = ("loss_one_vs_multi", "loss_resumed_vs_multi", "loss_resumed_twice")
        brief = {k: v for k, v in result.items() if k not in lists}
        for key in (k for k in lists if k in result):
            brief[key] = {k: v for k, v in result[key].items() if k not in ("abs_diff", "steps")}
        print(json.dumps(brief))


if __name__ == "__main__":
    main()
