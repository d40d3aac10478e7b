"""Two data-parallel processes (gloo, CPU) give the gradient of one process with the same global batch."""

import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, str(WORKER), "--out", str(single)], check=True, timeout=300)
    port, out = free_port(), tmp_path / "dual.pt"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world-size", "2",
                               "--port", str(port), "--out", str(out)]) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    one, two = torch.load(single, weights_only=True), torch.load(out, weights_only=True)
    assert one["count"] == two["count"] == 10  # the pair count is summed across ranks
    assert two["rows"] < one["rows"]
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    for name, g in one["grads"].items():
        rel = (two["grads"][name] - g).abs().max() / g.abs().max()
        assert rel <= 1e-5, f"{name}: {rel:.2e}"
