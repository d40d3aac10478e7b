"""Two data-parallel processes (gloo, CPU) give the loss and gradients of one process with the same
global batch: by hand (DDP's all-reduce) and sharded (FSDP2), plus the sharded checkpoint."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(out: Path, *extra: str) -> dict:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world-size", "2",
                               "--port", str(port), "--out", str(out), *extra]) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(WORKER), "--out", str(out)], check=True, timeout=300)
    return torch.load(out, weights_only=True)


def assert_same_step(one: dict, two: dict) -> None:
    assert one["count"] == two["count"] == 10  # the pair count is summed across ranks
    assert two["rows"] < one["rows"]
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        rel = (two["grads"][name] - g).abs().max() / g.abs().max()
        assert rel <= 1e-5, f"{name}: {rel:.2e}"


def test_two_processes_equal_one(single, tmp_path):
    assert_same_step(single, run_two(tmp_path / "dual.pt"))


def test_fsdp2_two_processes_equal_one_and_the_sharded_optimizer_state_round_trips(single, tmp_path):
    """FSDP2 on 2 ranks, one of which gets an empty row (the sharded reference must still run
    there): the same loss and gradients; Adam's second moments after one step, saved sharded and
    loaded into a fresh optimizer, equal the single process's."""
    two = run_two(tmp_path / "fsdp.pt", "--fsdp", "--checkpoint", str(tmp_path / "sharded"))
    assert_same_step(single, two)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt"]
    assert single["exp_avg_sq"].keys() == two["exp_avg_sq"].keys()
    for name, v in single["exp_avg_sq"].items():
        torch.testing.assert_close(two["exp_avg_sq"][name], v, rtol=2e-5, atol=1e-12, msg=name)
