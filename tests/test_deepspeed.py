"""`prefixpo train` under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), against one process without
DeepSpeed that trains the same global batch. Skipped where deepspeed is not installed (CI).

The ranks are started by `accelerate launch --config_file examples/accelerate/zero3.yaml
--num_processes 2` (the example file as it is; prefixpo's `bf16: false` makes it fp32), running
tests/deepspeed_cpu.py, which lets accelerate pick gloo on a machine without GPUs. The DeepSpeed
run accumulates 2 micro-batches per step, so a loss divided again by DeepSpeed's accumulation
steps would halve the logged gradient norm.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_distributed import free_port
from test_train import assert_close_weights, assert_same_losses, records, two_process_config

from prefixpo.cli import main

pytest.importorskip("deepspeed")

HARNESS = Path(__file__).with_name("deepspeed_cpu.py")
TIMING = {"pairs_per_s", "tokens_per_s", "step_time_s", "slowest_rank_idle", "elapsed_s"}


def launch_zero3(*args: str) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "zero3.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(HARNESS), "train", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(one process with accumulation 4, ZeRO-3 on 2 ranks with accumulation 2, its config)."""
    one = tmp_path_factory.mktemp("one")
    assert main(["train", "--config", str(two_process_config(one)), "--gradient_accumulation_steps", "4"]) == 0
    two = tmp_path_factory.mktemp("zero3")
    config = two_process_config(two)
    launch_zero3("--config", str(config), "--gradient_accumulation_steps", "2")
    return one / "run", two / "run", config


def test_zero3_on_two_ranks_logs_the_losses_and_gradient_norms_of_one_process(runs):
    """The same train and eval losses, the same gradient norms (DeepSpeed did not divide the step's
    loss by its accumulation steps), and a final model that loads with from_pretrained and holds
    the one-process weights; checkpoints hold each rank's ZeRO partitions."""
    from transformers import AutoModelForCausalLM

    one, two, _ = runs
    want, got = records(one), records(two)
    assert [(r["split"], r["step"]) for r in got] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert_same_losses(want, got)
    for a, b in zip(want, got):
        if a["split"] == "train":
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
    # Adam moves every weight by about the learning rate, however small its gradient, so fp32
    # rounding (ZeRO-3 reduce-scatters each micro-batch's gradients, one process sums them) shows
    # in near-zero gradient elements as up to ~1% of one step (1e-3 here)
    loaded = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    oracle = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    assert loaded.keys() == oracle.keys()
    for k, w in oracle.items():
        torch.testing.assert_close(loaded[k], w, rtol=0, atol=2e-5, msg=k)
    checkpoint = two / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "deepspeed").iterdir()) == [
        "rng-0.pt", "rng-1.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["sharding"] == "deepspeed" and "optimizer" not in state


def test_zero3_resumes_from_its_checkpoint_with_the_uninterrupted_losses(runs, tmp_path):
    """Resumed from checkpoint-2 (the engine's weights and Adam state, the schedule, the RNG): the
    later lines of the uninterrupted run, exactly, and its final weights."""
    _, two, config = runs
    launch_zero3("--config", str(config), "--gradient_accumulation_steps", "2", "--output_dir",
                 str(tmp_path / "resumed"), "--resume_from_checkpoint", str(two / "checkpoint-2"))
    resumed = records(tmp_path / "resumed")
    assert [(r["split"], r["step"]) for r in resumed] == [("train", 3), ("train", 4), ("eval", 4)]
    later = [r for r in records(two) if r["step"] > 2]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in later]
    assert_close_weights(two / "final", tmp_path / "resumed" / "final")


def test_a_zero3_checkpoint_does_not_resume_without_deepspeed(runs, tmp_path, capsys):
    _, two, config = runs
    assert main(["train", "--config", str(config), "--output_dir", str(tmp_path / "plain"),
                 "--gradient_accumulation_steps", "4",  # the pairs per step of the 2 ranks' run, in one process
                 "--resume_from_checkpoint", str(two / "checkpoint-2")]) == 1
    assert "was saved with DeepSpeed; resume it with DeepSpeed too" in capsys.readouterr().err
