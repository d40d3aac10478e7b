"""A `trl dpo --config` YAML read by `prefixpo train`: mapped, TRL's defaults, warned, refused.

The subprocess tests run the installed ``prefixpo`` executable on a TRL YAML; the others check
``prefixpo.trl_config`` and docs/training.md's TRL table against TRL's own config classes.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from prefixpo.config import ConfigError, load_stages
from prefixpo.trl_config import HONOURED, IGNORED, MAPPED, TRL_DEFAULTS, TRL_KEYS, from_trl, is_trl_config

PREFIXPO = shutil.which("prefixpo") or "prefixpo"
MODEL = str(ROOT / "examples/quickstart/model/config.json")
TOKENIZER = str(ROOT / "examples/quickstart/tokenizer")
DATA = str(ROOT / "examples/quickstart/data/pref_train.jsonl")

# as TRL's docs write one (trl/scripts/dpo.py's example, as YAML), on the tiny model and local data
TRL_YAML = {
    "model_name_or_path": MODEL, "dtype": "float32", "attn_implementation": "sdpa",
    "dataset_name": DATA, "dataset_train_split": "train", "dataset_test_split": "train",
    "learning_rate": 5.0e-7, "num_train_epochs": 1, "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2, "max_steps": 2, "eval_strategy": "steps", "eval_steps": 50,
    "bf16": False, "gradient_checkpointing": True, "max_length": 256, "beta": 0.1, "loss_type": ["sigmoid"],
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "logging_steps": 1, "save_strategy": "no",
    "report_to": "none", "push_to_hub": False, "hub_model_id": "me/tiny-dpo", "dataloader_num_workers": 2,
    "remove_unused_columns": False, "use_peft": False, "lora_r": 32, "lora_alpha": 16,
    "tokenizer_name_or_path": TOKENIZER, "max_samples": 32,  # prefixpo's own keys
}


def train(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "their_trl.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / "run")}))
    return subprocess.run([PREFIXPO, "train", "--config", str(path), "--disable_progress_bar", "true"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def message_lines(stderr: str) -> list[str]:
    """stderr without progress bars and library warnings: prefixpo's own lines."""
    return [line for line in stderr.splitlines() if line.startswith("prefixpo train:")]


def test_a_trl_yaml_trains_unchanged(tmp_path):
    done = train(tmp_path, TRL_YAML)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower() and "prefixpo" in line]
    assert len(warnings) == 1, done.stderr
    ignored = warnings[0].split("ignored keys (no effect on training): ", 1)[1].split(", ")
    assert sorted(ignored) == sorted(["attn_implementation", "push_to_hub", "hub_model_id", "dataloader_num_workers",
                                      "remove_unused_columns"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    expected = {"dataset": DATA, "eval_dataset": DATA, "eval_split": "train", "eval_steps": 50,
                "learning_rate": 5.0e-7, "per_device_train_batch_size": 2, "lr_scheduler_type": "cosine",
                "gradient_checkpointing": True, "disable_dropout": True, "bf16": False, "lora_r": 32,
                "save_steps": None, "loss_type": "sigmoid", "max_length": 256}
    assert {k: saved[k] for k in expected} == expected
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("key, value", [("loss_type", "sigmoid_nrm"), ("use_dora", True), ("fp16", True),
                                        ("eval_strategy", "epoch"), ("neftune_noise_alpha", 5.0)])
def test_a_trl_key_prefixpo_cannot_honour_is_one_line_exit_2(tmp_path, key, value):
    done = train(tmp_path, {**TRL_YAML, key: value})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"`{key}`" in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_trl_defaults_fill_what_the_file_leaves_out():
    cfg, ignored = from_trl({"model_name_or_path": "m", "dataset_name": "d"})
    assert ignored == []
    assert cfg["num_train_epochs"] == 3.0 and cfg["per_device_train_batch_size"] == 8
    assert cfg["gradient_checkpointing"] is True and cfg["bf16"] is True and cfg["fp32_master_weights"] is True
    assert cfg["output_dir"] == "trainer_output" and cfg["save_steps"] == 500 and cfg["save_total_limit"] > 10**5
    assert cfg["learning_rate"] == 1e-6 and cfg["beta"] == 0.1 and cfg["max_length"] == 1024
    assert "eval_dataset" not in cfg and cfg["disable_dropout"] is True


def test_conversions():
    cfg, _ = from_trl({"datasets": [{"path": "a.jsonl"}, {"path": "org/b", "name": "x", "split": "tr"}],
                       "dataset_name": "ignored", "dtype": "bfloat16", "bf16": False, "use_peft": True,
                       "lora_dropout": 0.1, "loss_type": ["sigmoid", "aot_unpaired"], "warmup_steps": 0.05})
    assert cfg["dataset"] == [{"path": "a.jsonl", "split": "train"}, {"path": "org/b", "split": "tr", "subset": "x"}]
    assert cfg["bf16"] is True and cfg["fp32_master_weights"] is False
    assert cfg["lora_dropout"] == 0.0  # disable_dropout (TRL's default) zeroes LoRA's dropout too
    assert cfg["loss_type"] == ["sigmoid", "aot_unpaired"] and cfg["loss_weights"] == [1.0, 1.0]
    assert cfg["warmup_ratio"] == 0.05
    cfg, _ = from_trl({"dataset_name": "d", "precompute_ref_log_probs": True, "disable_dropout": False,
                       "use_peft": True, "lora_dropout": 0.1, "loss_type": "discopop", "discopop_tau": 0.1})
    assert cfg["reference_mode"] == "precomputed" and cfg["lora_dropout"] == 0.1
    assert cfg["loss_params"] == {"tau": 0.1}
    for mode, ours in (("reduce-overhead", "reduce-overhead"), (None, "default")):  # transformers' unset is None
        cfg = from_trl({"dataset_name": "d", "torch_compile_mode": mode, "torch_compile": False})[0]
        assert cfg["torch_compile_mode"] == ours and cfg["torch_compile"] is (mode is not None)  # a mode compiles


@pytest.mark.parametrize("raw, key", [({"max_length": None}, "max_length"), ({"dtype": "auto"}, "dtype"),
                                      ({"logging_steps": 0.1}, "logging_steps"),
                                      ({"truncation_mode": "keep_end"}, "truncation_mode"),
                                      ({"optim": "adafactor"}, "optim"), ({"packing": True}, "packing"),
                                      ({"datasets": [{"path": "a", "fraction": 0.5}]}, "datasets[0].fraction"),
                                      ({"load_in_4bit": True, "use_peft": True}, "use_bnb_nested_quant")])
def test_refusals_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}`")):
        from_trl({"dataset_name": "d", **raw})


def test_detection(tmp_path):
    assert is_trl_config({"dataset_name": "d"}) and is_trl_config({"dataset": "d", "push_to_hub": False})
    assert not is_trl_config({"dataset": "d", "learning_rate": 1e-5})
    assert not is_trl_config({"dataset_name": "d", "stages": [{}]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": MODEL, "dataset_name": DATA, "lerning_rate": 1}))
    with pytest.raises(ConfigError, match="did you mean `learning_rate`"):
        load_stages(path)


# --- against TRL's own config classes ----------------------------------------------------------

def trl_classes():
    pytest.importorskip("trl")
    from transformers import TrainingArguments
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments

    return TrainingArguments, DPOConfig, (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig)


def default(field: dataclasses.Field):
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def test_every_key_of_trl_dpo_is_mapped_warned_or_refused():
    _, _, classes = trl_classes()
    keys = {f.name for c in classes for f in dataclasses.fields(c)}
    assert not keys - TRL_KEYS, f"TRL keys prefixpo's trl_config does not classify: {sorted(keys - TRL_KEYS)}"
    assert not set(MAPPED) & set(HONOURED) and not set(MAPPED) & IGNORED and not set(HONOURED) & IGNORED


def test_the_filled_in_defaults_are_trls():
    _, _, classes = trl_classes()
    defaults = {}
    for c in classes:  # later classes win, as DPOConfig's overrides of TrainingArguments do
        defaults.update({f.name: default(f) for f in dataclasses.fields(c) if f.name != "datasets"})
    wrong = {k: (v, defaults[k]) for k, v in TRL_DEFAULTS.items() if k in defaults and defaults[k] != v}
    assert not wrong, f"TRL_DEFAULTS differ from TRL's (ours, TRL's): {wrong}"
    # every honoured key accepts TRL's default
    refused = {k: defaults[k] for k, (allowed, _) in HONOURED.items() if k in defaults and defaults[k] not in allowed}
    assert not refused, refused


def trl_table() -> list[tuple[str, str, str]]:
    """``(TRL cell, prefixpo cell, note)`` of docs/training.md's TRL mapping table."""
    text = (ROOT / "docs" / "training.md").read_text()
    text = text.split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [tuple(r[:3]) for r in rows[1:]]


def test_the_docs_trl_table_covers_dpoconfig():
    """Every DPOConfig field that TrainingArguments lacks is in the table: mapped, or not applicable
    with the reason; and the module classifies each the same way."""
    training_arguments, dpo_config, _ = trl_classes()
    plain = {f.name for f in dataclasses.fields(training_arguments)}
    own = [f.name for f in dataclasses.fields(dpo_config) if f.name not in plain]
    rows = {name: (mapped, note) for trl, mapped, note in trl_table() for name in re.findall(r"`(\w+)", trl)}
    missing = [k for k in own if k not in rows]
    assert not missing, f"docs/training.md's TRL table lacks DPOConfig fields: {missing}"
    for key in own:
        mapped, note = rows[key]
        if mapped in ("not applicable", "-"):
            assert note, f"`{key}` is not applicable without a reason"
            assert key in IGNORED or key in HONOURED, f"`{key}`: the docs say not applicable, trl_config maps it"
        else:
            assert key in MAPPED, f"`{key}`: the docs map it to {mapped}, trl_config does not"
