"""Checkpoints: transformers-format weights plus the training state, written atomically.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/`` with the model (``save_pretrained``, safetensors),
the tokenizer, and ``training_state.pt`` (optimizer, scheduler, RNG states, the step and the data
position). It is written to a temporary directory and renamed into place, so a crash never
leaves a half-written checkpoint where a finished one is expected; only the last
``save_total_limit`` are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "training_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG's state, as plain containers and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(model: torch.nn.Module, tokenizer: Any, directory: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` of ``model``; ``state_dict`` (a full one, gathered from sharded ranks)
    replaces the model's own parameters when given."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    state: dict[str, Any], save_total_limit: int,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and drop the oldest beyond ``save_total_limit``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp, state_dict)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """``latest`` (the newest finished checkpoint in ``output_dir``) or a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest, but {output_dir} holds no finished checkpoint")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a prefixpo checkpoint (no {STATE_FILE})")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
