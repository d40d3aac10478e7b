"""The README's first command, exactly as shipped: SFT then DPO on CPU, reward accuracy above 0.8."""

import json
import time

from conftest import ROOT

from prefixpo.cli import main


def test_quickstart_trains_and_reward_accuracy_rises(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    started = time.perf_counter()
    code = main(["train", "--config", "examples/quickstart.yaml", "--output_dir", str(tmp_path / "quickstart"),
                 "--disable_progress_bar", "true"])
    seconds = time.perf_counter() - started
    assert code == 0
    run = tmp_path / "quickstart" / "1-preference"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["rewards/accuracies"] < 0.5
    assert evals[-1]["rewards/accuracies"] > 0.8
    assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"]
    assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()
    print(f"quickstart: {seconds:.0f} s, eval reward accuracy {evals[-1]['rewards/accuracies']:.2f}")
