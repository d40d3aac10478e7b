"""Where a ``prefixpo train`` step's time goes: the trainer itself (through its CLI), profiled by
torch.profiler over a few optimizer steps in the middle of the run. docs/benchmarks.md ("The peer")
cites its output. Needs one CUDA GPU. From the repository root::

    PYTHONPATH=src python scripts/gpu_profile_train.py --config runs/h2h/hh-rlhf/prefixpo/config.yaml \
        --steps 20:30 --out runs/profile-hh

Any config works; ``scripts/head_to_head.py`` writes one per profile. It prints and writes to
``OUT/summary.json``, over the profiled steps: wall ms per step; **GPU busy %**, the union of the
kernels' intervals over the wall time (what the host leaves the GPU idle shows here); host time in
calls that wait for the GPU (synchronize, a copy to the host, ``.item()``) per step; and the top
host operations by self time. The run's ``metrics.jsonl`` is kept beside them. ``OUT/trace.json.gz`` is the Chrome/Perfetto trace.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
         "cudaMemcpyAsync")


def busy_ms(events: list) -> float:
    """The union of the GPU kernels' time intervals, in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", default="20:30", help="first:last optimizer step profiled (1-based, last excluded)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--top", type=int, default=25)
    args, overrides = parser.parse_known_args()
    first, last = (int(x) for x in args.steps.split(":"))
    if not 1 <= first < last:
        sys.exit(f"--steps takes first:last with 1 <= first < last, got {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from prefixpo import cli, trainer

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    state = {"warm": False, "t0": 0.0, "wall": 0.0}
    inner, inner_warm_up = trainer.forward_backward, trainer.warm_up

    def warm_up(run: trainer.Run) -> None:  # its forward_backward calls are not steps
        inner_warm_up(run)
        state["warm"] = True

    def forward_backward(run: trainer.Run, step: list, groups: list, reference: object,
                         train: bool = True) -> object:
        if not (train and state["warm"]):
            return inner(run, step, groups, reference, train)
        if run.step + 1 == first and not state["t0"]:
            if cuda:
                torch.cuda.synchronize()
            prof.start()
            state["t0"] = time.perf_counter()
        if run.step + 1 == last and state["t0"] and not state["wall"]:
            if cuda:
                torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            prof.stop()
        return inner(run, step, groups, reference, train)

    trainer.forward_backward, trainer.warm_up = forward_backward, warm_up
    output = out / "train-output"
    shutil.rmtree(output, ignore_errors=True)
    rc = cli.main(["train", "--config", args.config, "--output_dir", str(output), *overrides])
    if not state["wall"]:
        sys.exit(f"the run ended (rc {rc}) before step {last}: lower --steps")
    events = prof.events()
    steps = last - first
    waits = {name: 0.0 for name in WAITS}
    for e in events:
        if e.name in waits:
            waits[e.name] += (e.time_range.end - e.time_range.start) / 1e3
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    busy = busy_ms(events)
    summary = {"config": args.config, "steps": [first, last], "wall_ms_per_step": 1e3 * state["wall"] / steps,
               "gpu_busy_ms_per_step": busy / steps, "gpu_busy_pct": 100 * busy / (1e3 * state["wall"]),
               "host_wait_ms_per_step": {k: v / steps for k, v in waits.items() if v},
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "top_host_ops.txt").write_text(table)
    prof.export_chrome_trace(str(out / "trace.json"))
    with open(out / "trace.json", "rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "trace.json").unlink()
    if (output / "metrics.jsonl").is_file():
        shutil.copy(output / "metrics.jsonl", out / "metrics.jsonl")
    shutil.rmtree(output, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    print(table)


if __name__ == "__main__":
    main()
