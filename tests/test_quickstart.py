"""The README's first command, exactly as typed, through the installed executable: SFT then DPO on
CPU from a fresh directory beside the repository's examples/, reward accuracy above 0.8."""

import json
import re
import shutil
import subprocess
import time

from conftest import ROOT


def test_quickstart_trains_and_reward_accuracy_rises(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    started = time.perf_counter()
    done = subprocess.run([shutil.which("prefixpo") or "prefixpo", "train", "--config", "examples/quickstart.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # no transformers bars between the trainer's own lines (stage 2 loads stage 1's final/ weights)
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr
    run = tmp_path / "runs" / "quickstart" / "1-preference"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["rewards/accuracies"] < 0.5
    assert evals[-1]["rewards/accuracies"] > 0.8
    assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"]
    assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()
    assert (tmp_path / "runs" / "quickstart" / "curves.png").is_file()  # both stages in one figure
    # what the user reads on stdout: one line per stage, with the final eval accuracy
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["stage sft done", "stage preference done"]
    assert f"rewards/accuracies {evals[-1]['rewards/accuracies']:.4f}" in lines[-1]
    # each stage's start-up line: the second counts the first stage apart from its own set-up
    starts = [line for line in done.stderr.splitlines() if line.startswith("start-up: ")]
    assert len(starts) == 2 and "earlier stages" not in starts[0], starts
    earlier, before = (float(re.search(rf"{k} ([0-9.]+)s", starts[1]).group(1)) for k in ("earlier stages",
                                                                                           "before setup"))
    assert earlier > 1 and before < earlier, starts[1]
    print(f"quickstart: {seconds:.0f} s, eval reward accuracy {evals[-1]['rewards/accuracies']:.2f}")
