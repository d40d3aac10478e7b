"""Training configuration files: YAML stages with command-line overrides, read into validated configs.

The keys, their defaults and their checks are ``TrainConfig``'s (``prefixpo.train_config``); a
``trl dpo --config`` YAML is read through ``prefixpo.trl_config``. A YAML file holds the keys of
``TrainConfig`` at the top level, and optionally ``stages``: a list of per-stage overrides run in
order, each stage starting from the previous stage's final weights::

    model_name_or_path: examples/quickstart/model/config.json
    output_dir: runs/quickstart
    stages:
      - {stage: sft, dataset: data/sft.jsonl, learning_rate: 1.0e-3}
      - {stage: preference, dataset: data/pref.jsonl, beta: 0.1}

Command-line overrides: ``--key value`` (all stages) or ``--STAGE.key value`` (one stage, by its
``stage`` name), values parsed as YAML (``--bf16 true``, ``--loss_type [sigmoid,sft]``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from prefixpo.errors import ConfigError
from prefixpo.train_config import FIELDS, FLOAT_FIELDS, TrainConfig
from prefixpo.trl_config import is_trl_config, read_trl

# ConfigError (errors.py) and TrainConfig (train_config.py) are re-exported: prefixpo.config is where
# the trainer and users import a run's config from
__all__ = ["ConfigError", "TrainConfig", "load_stages", "parse_overrides", "save_config"]


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``1e-6`` (no dot) as a string; numbers for float keys are taken as floats."""
    out = dict(values)
    for key in FLOAT_FIELDS & out.keys():
        if isinstance(out[key], str):
            try:
                out[key] = float(out[key])
            except ValueError:
                raise ConfigError(f"config key `{key}`: expected a number, got {out[key]!r}") from None
        elif isinstance(out[key], int) and not isinstance(out[key], bool):
            out[key] = float(out[key])
    return out


def _check_keys(keys: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"unknown config key `{key}` in {where}{hint}")


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs (or ``--key=value``; a bare ``--flag`` is true), values parsed as YAML.
    Dashes in a key read as underscores (``--learning-rate``); values are kept as typed.

    >>> parse_overrides(["--learning-rate", "2.0e-5", "--sft.bf16", "--output_dir=/runs/my-run"])
    {'learning_rate': 2e-05, 'sft.bf16': True, 'output_dir': '/runs/my-run'}
    """
    out: dict[str, Any] = {}
    items = list(args)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or item == "--":
            raise ConfigError(f"expected --key value on the command line, got {item!r}")
        key, eq, value = item[2:].partition("=")
        if not eq:
            value = items.pop(0) if items and not items[0].startswith("--") else "true"
        stage, dot, name = key.rpartition(".")
        key = stage + dot + name.replace("-", "_")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--{key} on the command line: {value!r} is not a valid value "
                              f"({str(err).splitlines()[0]})") from None
    return out


def load_stages(path: str | Path | None, overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """The validated config of each stage, from a YAML file and command-line overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(raw).__name__}")
    if is_trl_config(raw):  # a `trl dpo --config` YAML (docs/training.md)
        raw = read_trl(raw, str(path))
    stages = raw.pop("stages", None) or [{}]
    _check_keys(list(raw), str(path))
    top = dict(raw)
    every: dict[str, Any] = {}  # --key value: every stage, over what the file and its stages say
    per_stage: dict[str, dict[str, Any]] = {}
    for key, value in parse_overrides(overrides).items():
        if "." in key:
            name, sub = key.split(".", 1)
            per_stage.setdefault(name, {})[sub] = value
        else:
            _check_keys([key], "the command line (--" + key + ")")
            every[key] = value
    configs = []
    for i, stage in enumerate(stages):
        _check_keys(list(stage), f"stages[{i}]")
        merged = {**top, **stage, **every}
        name = merged.get("stage", "preference")
        _check_keys(list(per_stage.get(name, {})), f"the command line (--{name}.*)")
        merged.update(per_stage.get(name, {}))
        if len(stages) > 1:
            merged["output_dir"] = str(Path(merged.get("output_dir", TrainConfig.output_dir)) / f"{i}-{name}")
            if i > 0 and "model_name_or_path" not in stage:
                merged["model_name_or_path"] = str(Path(configs[-1].output_dir) / "final")
                merged.setdefault("tokenizer_name_or_path", configs[-1].tokenizer_name_or_path)
        unknown_stage = set(per_stage) - {s.get("stage", every.get("stage", top.get("stage", "preference")))
                                          for s in stages}
        if unknown_stage:
            raise ConfigError(f"overrides for stage(s) {sorted(unknown_stage)}, which the config does not have")
        try:
            cfg = TrainConfig(**_coerce(merged))
        except TypeError as err:
            raise ConfigError(str(err)) from None
        configs.append(cfg.validate())
    return configs


def save_config(config: TrainConfig, path: str | Path, **extra: Any) -> None:
    """``config`` as YAML (and ``extra`` keys, e.g. a checkpoint's ``world_size``)."""
    Path(path).write_text(yaml.safe_dump({**dataclasses.asdict(config), **extra}, sort_keys=False))
