import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, CONFIGS, tiny_model

import prefixpo.masks
from prefixpo.cli import main


def verify(*args: str) -> int:
    return main(["verify", *args])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_verify_passes_on_every_architecture(name, capsys):
    assert verify("--model", str(CONFIGS / f"tiny-{name}.json"), "--num-groups", "3") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff logps=") and " grads=" in last


def test_verify_json_can_be_checked_independently(tmp_path):
    path = tmp_path / "verify.json"
    assert verify("--model", str(CONFIGS / "tiny-qwen2.json"), "--num-responses", "3", "--json", str(path)) == 0
    report = json.loads(path.read_text())
    model = tiny_model("qwen2", seed=report["seed"])
    worst = 0.0
    for group in report["groups"]:
        assert len(group["response_ids"]) == 3
        for response, shared, separate in zip(group["response_ids"], group["logps_shared"], group["logps_separate"]):
            ids = torch.tensor([group["prompt_ids"] + response])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            logps = F.log_softmax(logits[:-1].double(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
            mine = logps[len(group["prompt_ids"]) - 1:].sum().item()
            assert abs(mine - separate) < 1e-3
            worst = max(worst, abs(shared - separate))
    assert report["max_abs_diff"]["logps"] == pytest.approx(worst, abs=1e-4)
    assert report["max_abs_diff"]["grads"] < 1e-4


def test_verify_fails_on_a_wrong_mask(monkeypatch, capsys):
    def plain_causal(document_ids, segment_ids, position_ids, sliding_window=None):
        return lambda b, h, q, k: k <= q

    monkeypatch.setattr(prefixpo.masks, "prefix_mask_mod", plain_causal)
    assert verify("--model", str(CONFIGS / "tiny-llama.json")) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_flex_on_cpu_compares_logps_only(capsys):
    assert verify("--model", str(CONFIGS / "tiny-mistral.json"), "--backend", "flex", "--num-groups", "2") == 0
    assert capsys.readouterr().out.strip().endswith("grads=n/a")


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/dir/config.json"], "--model: no local file no/such/dir/config.json"),
    (["--model", str(CONFIGS / "tiny-llama.json"), "--num-responses", "0"], "at least 1"),
    (["--model", str(CONFIGS / "tiny-llama.json"), "--device", "cuda"], "no CUDA device"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert verify(*args) == 2
    assert message in capsys.readouterr().err


def test_config_json_without_model_type(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    assert verify("--model", str(path)) == 2
    assert "model_type" in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        verify("--model", "x", "--backend", "nonsense")
    assert exc.value.code == 2


def test_verify_packing_passes_and_packs_several_groups_per_row(capsys):
    assert verify("--model", str(CONFIGS / "tiny-qwen3.json"), "--packing", "--num-groups", "6") == 0
    out = capsys.readouterr().out
    assert "packing=auto" in out and "PASS" in out


def test_verify_packing_fails_when_groups_in_a_row_see_each_other(monkeypatch):
    def no_document_rule(document_ids, segment_ids, position_ids, sliding_window=None):
        def mask_mod(b, h, q, k):
            key_segment = segment_ids[b, k]
            return (k <= q) & ((key_segment == 0) | (key_segment == segment_ids[b, q]))
        return mask_mod

    monkeypatch.setattr(prefixpo.masks, "prefix_mask_mod", no_document_rule)
    # one group per row: the missing document rule cannot matter ...
    assert verify("--model", str(CONFIGS / "tiny-llama.json"), "--num-groups", "4") == 0
    # ... packed, it must be caught
    assert verify("--model", str(CONFIGS / "tiny-llama.json"), "--num-groups", "4", "--packing") == 1
