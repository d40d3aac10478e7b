"""Where models, tokenizers, datasets and checkpoints come from: checked before anything loads.

A value that exists on disk is local. A value that does not exist and looks like a path (it starts
with ``/``, ``./``, ``../`` or ``~``, ends in a file suffix such as ``.jsonl``, or is not a valid
Hub repo id) is reported at once and never sent to the Hub. Anything else is a Hub name: with
``HF_HUB_OFFLINE`` (``TRANSFORMERS_OFFLINE`` for models and tokenizers, ``HF_DATASETS_OFFLINE`` for
datasets) it must be in the local Hugging Face cache; online, one metadata request with a short
timeout (``HUB_TIMEOUT`` seconds, no retries) tells a missing name from an unreachable Hub, and an
unreachable Hub falls back to the cache. Every failure is one :class:`SourceError` line naming the
label (a config key or a flag), the value and what was looked for::

    >>> from prefixpo.sources import check_model
    >>> check_model("./nosuch-model", "config key `model_name_or_path`")
    Traceback (most recent call last):
    ...
    prefixpo.sources.SourceError: config key `model_name_or_path`: no local directory ./nosuch-model (and it is not a Hub name)

The loaders (transformers, datasets) then run as before; these checks only make a wrong name
fail in a second instead of after a minute of retries and a long traceback.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefixpo.checkpoint import STATE_FILE, list_checkpoints, locate_checkpoint
from prefixpo.errors import ConfigError

Kind = Literal["model", "tokenizer", "dataset"]

HUB_TIMEOUT = float(os.environ.get("PREFIXPO_HUB_TIMEOUT", "1.5"))
"""Seconds one Hub metadata request may take before the Hub counts as unreachable."""

PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".yaml", ".yml",
                 ".gz", ".zip", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model")
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
_TRUE = {"1", "on", "yes", "true"}


class SourceError(ValueError):
    """A model, tokenizer, dataset or checkpoint that is neither on disk nor reachable; one line."""


@dataclass(frozen=True)
class Found:
    """Where a value was found: ``local`` (on disk), ``hub`` (the Hub has it) or ``cache`` (the local
    Hugging Face cache has it, the Hub was offline or unreachable)."""

    value: str
    where: Literal["local", "hub", "cache"]


_found: dict[tuple[str, str], Found] = {}  # (kind, value) -> Found, so a value is checked once per process
_hub_unreachable: str | None = None  # why the Hub did not answer, once it did not


def looks_like_path(value: str) -> bool:
    """Whether ``value`` can only mean a local path: a path prefix, a file suffix, or not a repo id."""
    if value in (".", "..") or value.startswith(PATH_PREFIXES) or value.lower().endswith(FILE_SUFFIXES):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def offline(kind: Kind) -> str | None:
    """The setting that puts ``kind`` in offline mode, if one is on: the environment variable, or
    the flag huggingface_hub (and datasets, once imported) read from it."""
    import sys

    from huggingface_hub import constants

    names = ["HF_HUB_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if kind == "dataset" else ["TRANSFORMERS_OFFLINE"])
    found = next((n for n in names if os.environ.get(n, "").strip().lower() in _TRUE), None)
    if found is None and (constants.HF_HUB_OFFLINE or (kind == "dataset" and "datasets.config" in sys.modules
                                                       and getattr(sys.modules["datasets.config"], "HF_HUB_OFFLINE", False))):
        found = "HF_HUB_OFFLINE"
    return found


def in_cache(name: str, kind: Kind) -> bool:
    """Whether the local Hugging Face cache holds ``name`` (a model's config.json, a tokenizer file,
    or a dataset's Hub snapshot or prepared copy)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if kind == "dataset":
        from huggingface_hub.file_download import repo_folder_name

        hub = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset") / "snapshots"
        prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return (hub.is_dir() and any(hub.iterdir())) or (prepared / name.replace("/", "___")).is_dir()
    files = ("config.json",) if kind == "model" else TOKENIZER_FILES + ("config.json",)
    return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)


def _ask_hub(name: str, kind: Kind, timeout: float) -> bool | str:
    """One metadata request: True (the Hub has ``name``), False (it has not), or why the Hub did not
    answer. Run in a daemon thread, so a hanging DNS lookup cannot hold the caller past ``timeout``."""
    result: list[Any] = []
    start = time.monotonic()

    def ask() -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        api = HfApi()
        info = api.dataset_info if kind == "dataset" else api.model_info
        try:
            info(name, timeout=timeout)
            result.append(True)
        except GatedRepoError:  # it exists; loading it says what access is missing
            result.append(True)
        except RepositoryNotFoundError:
            result.append(False)
        except Exception as e:  # network errors, server errors: the Hub did not answer
            result.append(f"{type(e).__name__} after {time.monotonic() - start:.1f} s")

    thread = threading.Thread(target=ask, daemon=True, name=f"prefixpo-hub-{name}")
    thread.start()
    thread.join(timeout + 0.2)
    return result[0] if result else f"no answer in {timeout:g} s; PREFIXPO_HUB_TIMEOUT=SECONDS waits longer"


def check(value: str, kind: Kind, label: str) -> Found:
    """Where ``value`` (a model, tokenizer or dataset) comes from; :class:`SourceError` naming
    ``label``, ``value`` and what was looked for when it is neither on disk nor reachable."""
    global _hub_unreachable
    if (kind, value) in _found:
        return _found[(kind, value)]
    path = Path(value)
    if path.exists():
        _check_local(path, kind, label)
        found = Found(value, "local")
    elif looks_like_path(value):
        what = "file" if path.suffix.lower() in FILE_SUFFIXES else "file or directory" if kind == "dataset" \
            else "directory"
        raise SourceError(f"{label}: no local {what} {value} (and it is not a Hub name)")
    elif (env := offline(kind)) is not None:
        if not in_cache(value, kind):
            raise SourceError(f"{label}: {value} is not in the local Hugging Face cache and offline mode is on "
                              f"({env}=1); download it first, or give a local path")
        found = Found(value, "cache")
    else:
        answer = _hub_unreachable or _ask_hub(value, kind, HUB_TIMEOUT)
        if answer is False:
            raise SourceError(f"{label}: no {kind} {value} on the Hugging Face Hub (private or gated repos "
                              "need `hf auth login`)")
        if isinstance(answer, str):
            _hub_unreachable = answer  # one try per process: later names go straight to the cache
            if not in_cache(value, kind):
                raise SourceError(f"{label}: the Hub could not be reached ({answer}) and {value} is not in the "
                                  "local cache; check the name, your network, or download it first")
            found = Found(value, "cache")
        else:
            found = Found(value, "hub")
    _found[(kind, value)] = found
    return found


def _check_local(path: Path, kind: Kind, label: str) -> None:
    if kind == "dataset":
        return  # a file or a save_to_disk directory: the data loader names what is wrong with it
    wanted = MODEL_FILES if kind == "model" else TOKENIZER_FILES
    if path.is_file():
        raise SourceError(f"{label}: {path} is a file, not a {kind} directory (one with {wanted[0]})")
    if not any((path / name).is_file() for name in wanted):
        raise SourceError(f"{label}: {path} is a directory but not a {kind} (it has none of {', '.join(wanted)})")
    if kind == "model" and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        hint = f"; for random weights drawn from `seed`, give its config file: {path / 'config.json'}" \
            if (path / "config.json").is_file() else ""
        raise SourceError(f"{label}: {path} holds no weights (no *.safetensors or *.bin file){hint}")


def check_model(value: str, label: str, config_file: bool = False) -> Found:
    """``check(value, "model", label)``; with ``config_file`` an existing ``.json`` file (a model
    config: random weights) is accepted too."""
    if config_file and value.endswith(".json") and os.path.isfile(value):
        return Found(value, "local")
    return check(value, "model", label)


def check_tokenizer(value: str, label: str) -> Found:
    return check(value, "tokenizer", label)


def check_dataset(value: str, label: str) -> Found:
    return check(value, "dataset", label)


def check_checkpoint(value: str, output_dir: str | Path, label: str = "config key `resume_from_checkpoint`") -> None:
    """A ``resume_from_checkpoint`` value: ``latest``, or a finished checkpoint directory (one
    with ``training_state.pt``); the error lists the checkpoints that ``output_dir`` does hold."""
    if value in ("latest", "auto") or (locate_checkpoint(value, output_dir) / STATE_FILE).is_file():
        return  # a checkpoint directory, or a bare checkpoint name in output_dir
    held = [p.name for p in list_checkpoints(Path(output_dir))]
    there = f"{output_dir} holds {', '.join(held)} (or use `latest`)" if held else \
        f"{output_dir} holds no finished checkpoint"
    problem = f"{value} is not a checkpoint directory (no {STATE_FILE})" if Path(value).exists() else \
        f"no checkpoint directory {value}"
    raise SourceError(f"{label}: {problem}; {there}")


def check_stages(stages: Sequence[Any]) -> None:
    """Check every source of every training stage (``TrainConfig``) before any of them loads;
    a stage's ``output_dir/final``, written by an earlier stage, is taken on trust. Raises
    ``ConfigError`` naming the config key."""
    produced: set[str] = set()
    try:
        for cfg in stages:
            def key(name: str, stage: str = cfg.stage) -> str:
                return f"config key `{name}`" + (f" (stage {stage})" if len(stages) > 1 else "")

            if cfg.model_name_or_path not in produced:
                check_model(cfg.model_name_or_path, key("model_name_or_path"), config_file=True)
            tokenizer = cfg.tokenizer_name_or_path or cfg.model_name_or_path
            if tokenizer not in produced:
                label = key("tokenizer_name_or_path") if cfg.tokenizer_name_or_path else \
                    key("model_name_or_path") + " (the tokenizer too: tokenizer_name_or_path is not set)"
                check_tokenizer(tokenizer, label)
            if cfg.ref_model_name_or_path and cfg.ref_model_name_or_path not in produced:
                check_model(cfg.ref_model_name_or_path, key("ref_model_name_or_path"), config_file=True)
            for name in ("dataset", "eval_dataset") if cfg.eval_dataset else ("dataset",):
                many = isinstance(getattr(cfg, name), list)
                for i, source in enumerate(cfg.data_sources(evaluation=name == "eval_dataset")):
                    check_dataset(source.dataset, key(f"{name}[{i}]" if many else name))
            if cfg.resume_from_checkpoint:
                check_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, key("resume_from_checkpoint"))
            produced.add(str(Path(cfg.output_dir) / "final"))
    except SourceError as err:
        raise ConfigError(str(err)) from None
