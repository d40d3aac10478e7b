"""scripts/gpu_multi_run.sh, the several-GPU benchmark of docs/benchmarks.md, in its CPU dry run:
the whole script (weights, data, FSDP2 on 1 and on NGPU ranks through tests/fsdp_cpu.py under
torchrun, a sharded checkpoint, two resumes, the from_pretrained check, a plain run and the
summary) with a tiny model, so that a change to it is caught before a GPU run finds it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_multi_run.sh"


def dry_run(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """The script with the CPU launchers of its header and a tiny Llama (the quickstart's shape,
    its positions widened to the capybara profile's rows)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    config = json.loads((ROOT / "examples" / "quickstart" / "model" / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PY": "python",
           "MODEL": str(model), "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "ROWS": "16", "STEPS": "4", "SAVE": "2", "RESUME_STEPS": "1", "GA": "2", "PLAIN_STEPS": "2",
           "BUCKETS": "1", "BUDGET": "600",
           "LAUNCH1": "python -m torch.distributed.run --nproc_per_node 1",
           "LAUNCH": f"python -m torch.distributed.run --nproc_per_node {settings.get('NGPU', '2')}",
           "PORT_FLAG": "--master_port", "ENTRY": "tests/fsdp_cpu.py", "ONE_GPU": "",
           "EXTRA": "--bf16 false --attention_backend sdpa --packing_capacity 4096 --torch_num_threads 1",
           **settings}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_the_several_gpu_script_runs_through_on_cpu_ranks(tmp_path):
    """Every part exits 0; the 2-rank run logs the 1-rank run's losses, the resumed run's first step
    is the uninterrupted run's, and both saved models load with plain from_pretrained."""
    proc = dry_run(tmp_path, NGPU="2")
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
    assert summary["scaling"]["target"] == 1.8
    assert (out / "loss_curves.png").is_file()


@pytest.mark.parametrize("settings", [{"NGPU": "4", "GA": "6"}, {"NGPU": "3", "GA": "4"}])
def test_an_accumulation_that_does_not_split_over_the_gpus_stops_at_once(tmp_path, settings):
    proc = dry_run(tmp_path, **settings)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        f"GA ({settings['GA']}) must be a multiple of NGPU ({settings['NGPU']}): the same rows per step on 1 and "
        "NGPU GPUs"]
    assert not (tmp_path / "out").exists()
