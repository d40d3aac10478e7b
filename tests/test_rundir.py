"""A run directory belongs to one run: refusal to overwrite, `latest` / `auto` resume, continuing a
finished run to a larger max_steps (equal to training that far at once), command-line values."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_train import final_weights, timeless, write_config

from prefixpo.cli import main
from prefixpo.config import ConfigError, TrainConfig, load_stages, parse_overrides
from prefixpo.rundir import asks_for_more, clear_run, inspect_run, plan_stage

SHORT = {"max_steps": 4, "save_steps": 2, "max_samples": 40, "lr_scheduler_type": "constant"}


def last_err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_a_second_run_into_the_same_output_dir_is_refused_unless_asked(tmp_path, capsys):
    config = str(write_config(tmp_path, **SHORT))
    assert main(["train", "--config", config]) == 0
    before = final_weights(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--config", config, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "already holds a run (finished at step 4" in err and "--overwrite_output_dir" in err
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    # replaced: old checkpoints are gone, so the new run's are not pruned in favour of stale ones
    (tmp_path / "run" / "checkpoint-99").mkdir()
    (tmp_path / "run" / "checkpoint-99" / "training_state.pt").write_bytes(b"")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", "--config", config, "--seed", "1", "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    assert [r["step"] for r in timeless(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_latest_without_a_checkpoint_says_so_and_auto_starts(tmp_path, capsys):
    config = str(write_config(tmp_path, **SHORT))
    assert main(["train", "--config", config, "--resume_from_checkpoint", "latest"]) == 2
    err = last_err_line(capsys)
    assert "holds no finished checkpoint to resume" in err and "`auto`" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(["train", "--config", config, "--resume_from_checkpoint", "auto"]) == 0
    assert "no checkpoint to resume; starting it" in capsys.readouterr().err
    assert main(["train", "--config", config, "--resume_from_checkpoint", "auto"]) == 0
    assert "already finished at step 4; skipping (raise max_steps" in capsys.readouterr().err


def test_raising_max_steps_continues_a_finished_run_exactly(tmp_path):
    """4 steps, then continued to 8, equals 8 steps at once (constant learning rate), in metrics and weights."""
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    whole.mkdir(), extended.mkdir()
    assert main(["train", "--config", str(write_config(whole, **{**SHORT, "max_steps": 8}))]) == 0
    config = str(write_config(extended, **SHORT))
    assert main(["train", "--config", config]) == 0
    assert json.loads((extended / "run" / "training_done.json").read_text())["steps"] == 4
    assert main(["train", "--config", config, "--resume_from_checkpoint", "latest", "--max_steps", "8"]) == 0
    assert timeless(extended / "run" / "metrics.jsonl") == timeless(whole / "run" / "metrics.jsonl")
    a, b = final_weights(extended / "run"), final_weights(whole / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((extended / "run" / "training_done.json").read_text())["steps"] == 8


def test_a_finished_run_without_checkpoints_cannot_be_continued(tmp_path, capsys):
    config = str(write_config(tmp_path, **{**SHORT, "save_steps": None}))
    assert main(["train", "--config", config]) == 0
    assert main(["train", "--config", config, "--resume_from_checkpoint", "latest", "--max_steps", "6"]) == 2
    err = last_err_line(capsys)
    assert "kept no checkpoint to continue from" in err and str(tmp_path / "run" / "final") in err


def test_plan_stage_rules(tmp_path):
    def cfg(**kw) -> TrainConfig:
        return TrainConfig(model_name_or_path="m", dataset="d", output_dir=str(tmp_path), **kw)

    assert plan_stage(cfg()).action == "start"  # empty directory
    (tmp_path / "config.yaml").write_text("")  # written before anything loads: no run yet
    assert plan_stage(cfg()).action == "start"
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="unfinished: metrics.jsonl"):
        plan_stage(cfg())
    assert plan_stage(cfg(overwrite_output_dir=True)).clear
    with pytest.raises(ConfigError, match="no finished checkpoint"):
        plan_stage(cfg(resume_from_checkpoint="latest"))
    # a multi-stage run resumed past its earlier stages starts a stage that never saved
    assert plan_stage(cfg(resume_from_checkpoint="latest"), continuing=True).action == "start"
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "training_state.pt").write_bytes(b"")
    (tmp_path / ".tmp-checkpoint-5").mkdir()  # a save that did not finish is never resumed
    plan = plan_stage(cfg(resume_from_checkpoint="latest"))
    assert (plan.action, plan.checkpoint) == ("resume", str(tmp_path / "checkpoint-3"))
    clear_run(tmp_path)
    assert inspect_run(tmp_path).written == []


def test_asks_for_more():
    cfg = TrainConfig(model_name_or_path="m", dataset="d", max_steps=10)
    assert asks_for_more(cfg, {"steps": 8}) and not asks_for_more(cfg, {"steps": 10})
    epochs = TrainConfig(model_name_or_path="m", dataset="d", num_train_epochs=3)
    assert asks_for_more(epochs, {"steps": 50, "max_steps": -1, "num_train_epochs": 2.0})
    assert not asks_for_more(epochs, {"steps": 50, "max_steps": -1, "num_train_epochs": 3.0})
    assert not asks_for_more(epochs, {"steps": 50, "max_steps": 50, "num_train_epochs": 1.0})


def test_command_line_values_reach_the_config_unchanged(tmp_path):
    (cfg,) = load_stages(write_config(tmp_path), ["--output_dir=/runs/my-run", "--learning_rate=1e-5",
                                                  "--lr-scheduler-type", "cosine", "--resume_from_checkpoint",
                                                  "true"])
    assert (cfg.output_dir, cfg.learning_rate, cfg.lr_scheduler_type) == ("/runs/my-run", 1e-5, "cosine")
    assert cfg.resume_from_checkpoint == "latest"  # transformers' `true`
    assert parse_overrides(["--sft.max-steps=3"]) == {"sft.max_steps": 3}


def test_unknown_keys_name_where_they_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"`lerning_rate` in the command line \(--lerning_rate\)"):
        load_stages(write_config(tmp_path), ["--lerning_rate", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_config(tmp_path).read_text() + "lerning_rate: 1\n")
    with pytest.raises(ConfigError, match=f"`lerning_rate` in {bad}"):
        load_stages(bad)


def test_command_line_keys_win_over_the_file_and_its_stages(tmp_path):
    """`--key value` overrides the key in every stage, also where a stage sets it (docs/training.md)."""
    from conftest import ROOT

    sft, pref = load_stages(ROOT / "examples" / "quickstart.yaml",
                            ["--output_dir", str(tmp_path), "--learning_rate", "5.0e-4", "--sft.learning_rate", "0.1"])
    assert (sft.learning_rate, pref.learning_rate) == (0.1, 5e-4)  # both stages set learning_rate in the file
    assert pref.model_name_or_path == str(tmp_path / "0-sft" / "final")  # still chained


@pytest.mark.parametrize("override, message", [
    (["--adam_beta1", "1.5"], "`adam_beta1`: must be a number in [0, 1)"),
    (["--adam_beta2", "-0.1"], "`adam_beta2`: must be a number in [0, 1)"),
    (["--max_grad_norm", "-1"], "`max_grad_norm`: must be a number >= 0 (0 or null: no clipping)"),
    (["--weight_decay", "-0.01"], "`weight_decay`"),
    (["--adam_epsilon", "nan"], "`adam_epsilon`"),
    (["--learning_rate", "inf"], "`learning_rate`"),
    (["--warmup_steps", "1.5"], "`warmup_steps`"),
    (["--label_smoothing", "0.7"], "`label_smoothing`"),
])
def test_optimizer_values_are_checked_before_anything_loads(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_stages(write_config(tmp_path), override)


@pytest.mark.parametrize("value", ["0", "null"])
def test_max_grad_norm_0_or_null_means_no_clipping(tmp_path, value):
    """As in transformers and TRL; the gradient norm is still logged, and the update equals an
    unclipped one (a clip at 1e-9 would shrink the step by orders of magnitude)."""
    config = str(write_config(tmp_path, max_steps=2, save_steps=None, logging_steps=1, learning_rate=1e-3))
    runs = {}
    for name, norm in (("none", value), ("huge", "1.0e+9")):
        assert main(["train", "--config", config, "--max_grad_norm", norm, "--output_dir",
                     str(tmp_path / name)]) == 0
        runs[name] = timeless(tmp_path / name / "metrics.jsonl")
    assert runs["none"] == runs["huge"] and runs["none"][0]["grad_norm"] > 0


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path):
    """Two runs started into one folder at once: the second stops (exit 2, one line naming the
    first's pid) before writing anything; once the first ends, its lock is gone."""
    import os
    import shutil
    import subprocess

    from prefixpo.rundir import RunLock

    config = str(write_config(tmp_path, **SHORT))
    cmd = [shutil.which("prefixpo") or "prefixpo", "train", "--config", config]
    with RunLock(tmp_path / "run"):  # a run in progress
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1
    assert f"another run is writing to this output_dir (pid {os.getpid()} on" in busy.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0  # the lock went with its holder


def test_a_resume_with_other_training_settings_is_refused_before_anything_loads(tmp_path, capsys):
    """Each checkpoint keeps the config it was saved under. A resume that changes what the run
    trains with (learning rate, loss, data, seed; the pairs a step) stops in one line naming each
    changed key and what to do, leaving the run as it was (config.yaml too); one that changes only
    how it logs, saves or computes, how long it trains, or how a step's pairs are split into
    micro-batches, resumes with a note listing the changes."""
    config = str(write_config(tmp_path, **SHORT))
    assert main(["train", "--config", config, "--max_steps", "2"]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / "training_config.yaml").is_file()
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    for override, shown in ((["--learning_rate", "1e-4", "--loss_type", "ipo"], "learning_rate 0.001 -> 0.0001, "
                             "loss_type \"sigmoid\" -> \"ipo\""),
                            (["--seed", "7"], "seed 0 -> 7"),
                            (["--per_device_train_batch_size", "2"], None)):
        assert main(["train", "--config", config, "--max_steps", "4", "--resume_from_checkpoint", "latest",
                     *override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (f"resume_from_checkpoint checkpoint-2: this config changes what the checkpoint's run trained with "
                f"({shown}); resume with that run's settings ({run / 'checkpoint-2' / 'training_config.yaml'}), "
                f"or start a new run from its weights in another output_dir (model_name_or_path: "
                f"{run / 'checkpoint-2'})" if shown else
                "resume_from_checkpoint checkpoint-2: the checkpoint's run trained 8 pairs a step "
                "(per_device_train_batch_size x gradient_accumulation_steps x 1 processes), this config 4 "
                "(2 x 2 x 1); keep the pairs per step") in err, err
    assert (run / "config.yaml").read_text() == saved and [r["step"] for r in timeless(run / "metrics.jsonl")] == [1, 2]
    assert main(["train", "--config", config, "--max_steps", "4", "--resume_from_checkpoint", "latest",
                 "--logging_steps", "2", "--torch_compile", "false", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "4"]) == 0  # the same 8 pairs a step, split otherwise
    err = capsys.readouterr().err
    assert "resuming checkpoint-2 with changed settings: per_device_train_batch_size 4 -> 2, " \
           "gradient_accumulation_steps 2 -> 4, max_steps 2 -> 4, torch_compile \"auto\" -> false, " \
           "logging_steps 1 -> 2" in err, err
    assert [r["step"] for r in timeless(run / "metrics.jsonl")] == [1, 2, 4]  # logged every second step now


def test_a_checkpoint_named_alone_is_found_in_output_dir_and_later_ones_are_not_left_behind(tmp_path, capsys):
    """``--resume_from_checkpoint checkpoint-2`` means output_dir's checkpoint-2. Resuming it while
    checkpoint-4 of the same directory exists is refused (that checkpoint belongs to the run being
    replaced, and ``latest`` would resume it later); with checkpoint-4 moved away it resumes."""
    config = str(write_config(tmp_path, **SHORT))
    assert main(["train", "--config", config]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--config", config, "--max_steps", "6", "--resume_from_checkpoint", "checkpoint-2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"resume_from_checkpoint checkpoint-2: {run} holds later checkpoints (checkpoint-4) of the run this " \
           "resume would replace, which `latest` would pick up again; move or delete them first" in err, err
    (run / "checkpoint-4").rename(tmp_path / "kept-checkpoint-4")
    assert main(["train", "--config", config, "--max_steps", "6", "--resume_from_checkpoint", "checkpoint-2"]) == 0
    assert f"resumed from {run / 'checkpoint-2'} at step 2" in capsys.readouterr().err
    assert [r["step"] for r in timeless(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
