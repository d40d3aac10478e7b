"""TR-DPO (sync_ref_model): the mix against TRL's callback, a run's references against a replay by
hand, the refused combinations, and an exact resume (the reference is part of the checkpoint)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import QUICK, write_config

from prefixpo.cli import main
from prefixpo.config import ConfigError, TrainConfig
from prefixpo.reference import REFERENCE_DIR, REFERENCE_FILE, ReferenceSync

ALPHA = 0.6


def tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(QUICK / "model" / "config.json"))


def test_mix_equals_trl_sync_target_model():
    from trl.trainer.callbacks import SyncRefModelCallback

    policy, reference = tiny_llama(0), tiny_llama(1)
    theirs = copy.deepcopy(reference)
    # sync_target_model without DeepSpeed ZeRO-3 (it needs an initialised Accelerator to tell)
    SyncRefModelCallback._sync_target_model(policy, theirs, ALPHA)
    sync = ReferenceSync(policy, reference, ALPHA, every=3)
    assert not sync(2) and all(torch.equal(a, b) for a, b in zip(reference.parameters(), tiny_llama(1).parameters()))
    assert sync(3)
    ours, trl = dict(reference.named_parameters()), dict(theirs.named_parameters())
    assert ours.keys() == trl.keys() and all(torch.equal(ours[k], trl[k]) for k in ours)


def sync_config(tmp_path: Path, model: Path, **overrides) -> Path:
    keys = {"model_name_or_path": str(model), "max_steps": 6, "save_steps": 1, "save_total_limit": 100,
            "sync_ref_model": True, "ref_model_mixup_alpha": ALPHA, "ref_model_sync_steps": 2}
    return write_config(tmp_path, **{**keys, **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    tiny_llama(0).save_pretrained(path)
    return path


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_references_of_a_run_equal_a_replay_by_hand(tmp_path, model_dir):
    """Every checkpoint's reference equals the replay: the initial weights, mixed with the policy
    of steps 2, 4 and 6 (read from those checkpoints); from step 3 the losses leave a fixed-reference run's."""
    (tmp_path / "a").mkdir()
    assert main(["train", "--config", str(sync_config(tmp_path / "a", model_dir))]) == 0
    run = tmp_path / "a" / "run"
    replay_matches(run, load_file(model_dir / "model.safetensors"), 6)
    (tmp_path / "b").mkdir()
    assert main(["train", "--config", str(sync_config(tmp_path / "b", model_dir, sync_ref_model=False))]) == 0
    fixed = losses(tmp_path / "b" / "run")
    synced = losses(run)
    assert synced[:2] == fixed[:2] and all(a != b for a, b in zip(synced[2:], fixed[2:]))


def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, model_dir):
    """Resumed from checkpoint-3 (the reference mixed at step 2, mixed again at 4 and 6 after the
    resume): the same losses and bit-identical final weights; without its reference the resume is refused."""
    (tmp_path / "whole").mkdir()
    config = str(sync_config(tmp_path / "whole", model_dir))
    assert main(["train", "--config", config]) == 0
    whole = tmp_path / "whole" / "run"
    resumed = tmp_path / "resumed"
    assert main(["train", "--config", config, "--output_dir", str(resumed),
                 "--resume_from_checkpoint", str(whole / "checkpoint-3")]) == 0
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole)[3:] == losses(resumed)
    stripped = tmp_path / "stripped"
    shutil.copytree(whole / "checkpoint-3", stripped)
    shutil.rmtree(stripped / REFERENCE_DIR)
    (stripped / "manifest.json").unlink()
    assert main(["train", "--config", config, "--output_dir", str(tmp_path / "again"),
                 "--resume_from_checkpoint", str(stripped)]) != 0


@pytest.mark.parametrize("overrides, message", [
    ({"reference_mode": "precomputed"}, "reference_mode: precomputed"),
    ({"use_peft": True}, "use_peft"),
    ({"reference_free": True}, "uses no reference"),
    ({"loss_type": "simpo"}, "uses no reference"),
    ({"ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
    ({"ref_model_sync_steps": 0}, "ref_model_sync_steps"),
])
def test_refused_combinations_name_the_key(overrides, message):
    base = {"model_name_or_path": "m", "dataset": "d.jsonl", "stage": "preference", "sync_ref_model": True}
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{**base, **overrides}).validate()


def replay_matches(run: Path, initial: dict[str, torch.Tensor], steps: int) -> None:
    """Every checkpoint's saved reference equals the replay from ``initial`` and the policy checkpoints."""
    reference = {k: v.clone() for k, v in initial.items()}
    for step in range(1, steps + 1):
        if step % 2 == 0:
            policy = load_file(run / f"checkpoint-{step}" / "model.safetensors")
            for name, tensor in reference.items():
                tensor.mul_(1 - ALPHA).add_(policy[name], alpha=ALPHA)
        saved = load_file(run / f"checkpoint-{step}" / REFERENCE_DIR / REFERENCE_FILE)
        assert saved.keys() == reference.keys()
        assert all(torch.equal(saved[k], reference[k]) for k in saved), step


def test_fsdp2_mixes_local_shards_as_one_process_mixes_whole_tensors(tmp_path, model_dir):
    """FSDP2 on 2 CPU ranks: each rank mixes its shards of the sharded reference; the gathered
    references of every checkpoint equal the replay, the losses those of one process with the same
    global batch, and a run resumed from checkpoint-3 ends with the uninterrupted run's weights."""
    from test_train import assert_close_weights, launch_two

    harness = str(Path(__file__).with_name("fsdp_cpu.py"))
    (tmp_path / "two").mkdir()
    config = sync_config(tmp_path / "two", model_dir, max_steps=4, torch_num_threads=1, max_samples=48,
                         gradient_accumulation_steps=1)
    launch_two(harness, "train", "--config", str(config))
    run = tmp_path / "two" / "run"
    replay_matches(run, load_file(model_dir / "model.safetensors"), 4)
    (tmp_path / "one").mkdir()
    assert main(["train", "--config", str(sync_config(tmp_path / "one", model_dir, max_steps=4, max_samples=48)),
                 "--gradient_accumulation_steps", "2"]) == 0
    assert losses(run) == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-5)
    launch_two(harness, "train", "--config", str(config), "--output_dir", str(tmp_path / "resumed"),
               "--resume_from_checkpoint", str(run / "checkpoint-3"))
    assert losses(tmp_path / "resumed") == pytest.approx(losses(run)[3:], rel=1e-6)
    assert_close_weights(run / "final", tmp_path / "resumed" / "final")
