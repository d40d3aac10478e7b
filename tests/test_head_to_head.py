"""scripts/head_to_head.py on the CPU: TRL's DPOTrainer and ``prefixpo train`` train the same pairs alike.

A tiny random Llama, the four first pairs of the hh-rlhf profile, one step = all four pairs (so the
two trainers' data orders do not matter), three steps (three epochs), fp32, learning rate 1e-4:
both runs finish, log step 1 at ln 2 (the policy is the reference), the same summed log-probs and
gradient norm at step 1, and the same losses at steps 2 and 3 -- which take the first two AdamW updates and the linear
schedule's rates into account. prefixpo runs as the GPU default does: packed, its layers compiled
(warmed before step 1, so the script's ``recompiles`` column reads 0; TRL's reads "-").
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]


def test_trl_and_prefixpo_train_alike(tmp_path: Path) -> None:
    out = tmp_path / "h2h"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                      if p))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "head_to_head.py"), "--model", "examples/configs/tiny-llama.json",
         "--profiles", "hh-rlhf", "--pairs", "4", "--batch", "4", "--epochs", "3", "--device", "cpu",
         "--dtype", "float32", "--learning-rate", "1e-4", "--trainers", "trl-default,prefixpo", "--out", str(out),
         "--prefixpo-set", "torch_compile=true", "--prefixpo-set", "packing=true", "--label", "prefixpo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| hh-rlhf | trl-default |" in proc.stdout and "| hh-rlhf | prefixpo |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = {r["trainer"]: r for r in results["runs"]}
    sys.path.insert(0, str(ROOT / "scripts"))
    from head_to_head import source_digest

    assert results["meta"]["source_digest"] == source_digest()  # which code ran, git or not
    assert set(runs) == {"trl-default", "prefixpo"} and all(r["ok"] for r in runs.values())
    trl, ours = runs["trl-default"], runs["prefixpo"]
    assert trl["setup"]["weights_dtype"] == "float32" and not trl["setup"]["bf16_autocast"]
    assert trl["setup"]["rows"] == 4  # TRL dropped no pair
    startup = runs["prefixpo"]["startup_s"]  # prefixpo's start-up line, read from its log
    assert {"before setup", "data", "policy", "reference", "warm-up"} <= set(startup)
    # the start-up line prints tenths of a second: each figure is off by up to 0.05 s
    phases = [v for k, v in startup.items() if k != "total"]
    assert sum(phases) <= startup["total"] + 0.05 * (len(phases) + 1)
    assert startup["total"] <= runs["prefixpo"]["first_step_s"] + 0.05
    for run in (trl, ours):
        s = run["summary"]
        assert s["steps"] == 3 and s["pairs"] == 12
        assert s["steady_pairs_per_s"] > 0 and 0 < s["first_step_s"] < s["wall_s"]
        assert s["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    a, b = trl["summary"], ours["summary"]
    assert b["recompiles"] == 0 and a["recompiles"] is None  # prefixpo's compiled layers: nothing after the warm-up
    assert "| recompiles |" in proc.stdout and f"| {b['steady_pairs_per_s']:.2f} |" in proc.stdout
    assert a["grad_norms"][0] == pytest.approx(b["grad_norms"][0], rel=1e-4)
    for key in ("logps_chosen", "logps_rejected"):  # the same pairs at step 1: the same summed log-probs
        assert a[key][0] < 0 and a[key][0] == pytest.approx(b[key][0], rel=1e-5), key
    assert a["losses"][1] < math.log(2) - 0.05  # the update moved the loss: the comparison below means something
    assert a["losses"][1] == pytest.approx(b["losses"][1], abs=1e-4)
    assert a["losses"][2] == pytest.approx(b["losses"][2], abs=1e-4)
