"""scripts/gpu_multi_run.sh, the several-GPU benchmark of docs/benchmarks.md, in its CPU dry run:
the whole script (weights, data, FSDP2 on 1 and on NGPU ranks through tests/fsdp_cpu.py under
torchrun, a sharded checkpoint, two resumes, the from_pretrained check, a plain run and the
summary) with a tiny model, so that a change to it is caught before a GPU run finds it."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_multi_run.sh"


def free_ports(count: int = 4) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count < 65536 and all(_free(first + k) for k in range(1, count)):
            return first
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def dry_run(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """The script with the CPU launchers of its header and a tiny Llama (the quickstart's shape,
    its positions widened to the capybara profile's rows). Killed whole (torchrun's ranks too)
    if it runs past its limit."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    config = json.loads((ROOT / "examples" / "quickstart" / "model" / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    python = sys.executable
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PY": python,
           "MODEL": str(model), "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "ROWS": "16", "STEPS": "4", "SAVE": "2", "RESUME_STEPS": "1", "GA": "2", "PLAIN_STEPS": "2",
           "BUCKETS": "1", "BUDGET": "420", "PORT": str(free_ports()), "TITLE": "DPO on a tiny Llama",
           "LAUNCH1": f"{python} -m torch.distributed.run --nproc_per_node 1",
           "LAUNCH": f"{python} -m torch.distributed.run --nproc_per_node {settings.get('NGPU', '2')}",
           "PORT_FLAG": "--master_port", "ENTRY": "tests/fsdp_cpu.py", "ONE_GPU": "",
           "EXTRA": "--bf16 false --attention_backend sdpa --packing_capacity 4096 --torch_num_threads 1",
           **settings}
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("gpus", [2, 1])
def test_the_several_gpu_script_runs_through_on_cpu_ranks(tmp_path, gpus):
    """Every part exits 0; the NGPU-rank run (GA / NGPU accumulation steps) logs the 1-rank run's
    losses, the resumed run's first step is the uninterrupted run's, both saved models load with
    plain from_pretrained, and the scaling target is 0.9 x NGPU."""
    proc = dry_run(tmp_path, NGPU=str(gpus))
    out = tmp_path / "out"
    parts = (out / "parts.txt").read_text()
    for part in ("weights", "one", "multi", "resume", "resume2", "load", "plain", "summary"):
        assert f"part {part}: exit 0" in parts, parts + proc.stdout[-3000:]
    summary = json.loads((out / "multi_gpu_summary.json").read_text())
    assert summary["steps_logged"] == {"one": 4, "multi": 4, "resume": 1, "plain": 2}
    assert summary["loss_one_vs_multi"]["same_pairs_each_step"]
    assert summary["loss_one_vs_multi"]["max_abs_diff"] < 1e-5
    assert summary["loss_resumed_vs_multi"]["first_step_met"]
    assert summary["from_pretrained"]["ok"]
    assert summary["scaling"]["target"] == 0.9 * gpus
    assert f"fsdp_{gpus}_gpus" in summary["throughput"]
    assert (out / "loss_curves.png").is_file()


@pytest.mark.parametrize("settings, message", [
    ({"NGPU": "4", "GA": "6"}, "GA (6) must be a multiple of NGPU (4): the same rows per step on 1 and NGPU GPUs"),
    ({"NGPU": "3", "GA": "4"}, "GA (4) must be a multiple of NGPU (3): the same rows per step on 1 and NGPU GPUs"),
    ({"NGPU": "0"}, "NGPU must be a positive whole number, got '0'"),
], ids=["6-over-4", "4-over-3", "zero-gpus"])
def test_a_gpu_count_that_cannot_take_the_batch_stops_at_once(tmp_path, settings, message):
    proc = dry_run(tmp_path, **settings)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()
