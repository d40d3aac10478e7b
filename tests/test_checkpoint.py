"""Checkpoints carry a manifest (every file's size and CRC-32); a damaged checkpoint is named in one
line (exit 2) instead of being resumed."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import write_config

from prefixpo.checkpoint import MANIFEST, verify_checkpoint
from prefixpo.cli import main


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    assert main(["train", "--config", str(write_config(tmp, max_steps=4, save_steps=2, max_samples=40))]) == 0
    return tmp


def zeros_inside(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 65536] = bytes(min(65536, len(data) - len(data) // 2))
    path.write_bytes(bytes(data))


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # (file, how) -> what the message says
    ("model.safetensors", zeros_inside): "model.safetensors changed since it was saved",
    ("training_state.pt", cut_short): "training_state.pt has",
    ("model.safetensors", lambda p: p.unlink()): "model.safetensors is missing",
    ("tokenizer.json", lambda p: p.write_text("{}")): "tokenizer.json has",
}


@pytest.mark.parametrize("name, damage", list(DAMAGE), ids=[f"{n}-{i}" for i, (n, _) in enumerate(DAMAGE)])
def test_a_damaged_checkpoint_is_named_not_resumed(saved_run, tmp_path, capsys, name, damage):
    run = tmp_path / "run"
    shutil.copytree(saved_run / "run", run)
    config = write_config(tmp_path, max_steps=6, save_steps=2, max_samples=40)
    damage(run / "checkpoint-4" / name)
    assert main(["train", "--config", str(config), "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"checkpoint-4 is damaged: {DAMAGE[name, damage]}" in err
    assert "resume from another checkpoint (checkpoint-2 in" in err
    assert not (run / "checkpoint-6").exists()


def test_every_file_is_in_the_manifest(saved_run):
    checkpoint = saved_run / "run" / "checkpoint-4"
    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST}
    assert {"model.safetensors", "training_state.pt", "config.json"} <= files
    assert set(json.loads((checkpoint / MANIFEST).read_text())) == files
    assert verify_checkpoint(checkpoint) is None


def test_a_checkpoint_without_manifest_still_resumes(saved_run, tmp_path):
    """Checkpoints written before manifests existed are resumed as before."""
    run = tmp_path / "run"
    shutil.copytree(saved_run / "run", run)
    (run / "checkpoint-4" / MANIFEST).unlink()
    config = write_config(tmp_path, max_steps=6, save_steps=2, max_samples=40)
    assert main(["train", "--config", str(config), "--resume_from_checkpoint", "latest"]) == 0


def test_a_full_disk_during_a_save_names_the_path_and_removes_the_partial_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    import prefixpo.checkpoint
    import prefixpo.trainer

    real = prefixpo.checkpoint.save_model
    calls = {"n": 0}

    def filling(model, tokenizer, directory, state_dict=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: a partial file, then the disk is full
            (directory / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, tokenizer, directory, state_dict=state_dict)

    monkeypatch.setattr(prefixpo.trainer, "save_model", filling)
    config = write_config(tmp_path, max_steps=6, save_steps=2, max_samples=40)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert f"could not write {run / '.tmp-checkpoint-4'} (No space left on device;" in err
    assert f"The last good checkpoint is {run / 'checkpoint-2'}" in err
    assert not (run / ".tmp-checkpoint-4").exists() and verify_checkpoint(run / "checkpoint-2") is None
