"""Checkpoints: transformers-format weights plus the training state, written atomically.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/`` with the model (``save_pretrained``, safetensors),
the tokenizer, and ``training_state.pt`` (optimizer, scheduler, RNG states, the step and the data
position). It is written to a temporary directory and renamed into place, so a crash never
leaves a half-written checkpoint where a finished one is expected; only the last
``save_total_limit`` are kept.

Under FSDP the model is still saved whole (gathered from the shards), but the optimizer state
stays sharded: every rank writes its own shard with ``torch.distributed.checkpoint`` into
``sharded/``, with its RNG state, and ``training_state.pt`` holds no optimizer. All ranks write
into the same temporary directory (``.tmp-checkpoint-STEP``, a path every rank derives from the
step, so ``output_dir`` must be on a file system all nodes share); the main process renames it
once every rank has finished::

    start_checkpoint (main) -> barrier -> save_model (main) + save_sharded_state (all ranks)
        -> barrier -> finish_checkpoint (main: training_state.pt last, rename, prune) -> barrier

Under DeepSpeed the same sequence writes the engine's own checkpoint (ZeRO partitions of the
weights and optimizer state, one file pair per rank) into ``deepspeed/`` with
``save_engine_state``; ``deepspeed/zero_to_fp32.py`` (which deepspeed copies there) turns it
into fp32 weights. ``training_state.pt`` records which kind a checkpoint is (``sharding``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"  # every file of a checkpoint with its size and CRC-32, checked before a resume
SHARDED_DIR = "sharded"  # FSDP: the optimizer shards and per-rank RNG states
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed: the engine's checkpoint and per-rank RNG states
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


def checkpoint_dirs(output_dir: Path, step: int) -> tuple[Path, Path]:
    """``(final, temporary)`` directories of the checkpoint at ``step``."""
    return output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"


def start_checkpoint(output_dir: Path, step: int) -> Path:
    """An empty temporary directory for ``checkpoint-STEP`` (main process only)."""
    _, tmp = checkpoint_dirs(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(output_dir: Path, step: int, state: dict[str, Any], save_total_limit: int) -> Path:
    """Main process, after every rank has written its part: write the training state (last: it
    marks a finished checkpoint), rename into place and drop the oldest beyond ``save_total_limit``."""
    final, tmp = checkpoint_dirs(output_dir, step)
    torch.save(state, tmp / STATE_FILE)
    write_manifest(tmp)
    if final.exists():  # the same step saved again: move the old one aside whole, never delete it first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank: its shard of the optimizer state (``torch.distributed.checkpoint``) and its RNG
    state, into ``directory`` (the same path on every rank). ``model`` is the FSDP-sharded model
    the optimizer steps; the state is keyed by parameter names, so it reloads on another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory))
    save_rank_rng(directory)


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank: load what ``save_sharded_state`` wrote into the (already sharded) optimizer, and
    this rank's RNG state (rank 0's when the checkpoint had fewer ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # the template to load into: torch fills in the state with a zero-lr step, but only when no
    # parameter holds a gradient yet (loading is done between steps)
    optimizer.zero_grad(set_to_none=True)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    load_rank_rng(directory)


def save_rank_rng(directory: Path) -> None:
    """Every rank: its RNG state, as ``directory/rng-RANK.pt``."""
    import torch.distributed as dist

    torch.save(rng_state(), directory / f"rng-{dist.get_rank()}.pt")


def load_rank_rng(directory: Path) -> None:
    """Every rank: its RNG state from ``save_rank_rng`` (rank 0's when the checkpoint had fewer ranks)."""
    import torch.distributed as dist

    rng = directory / f"rng-{dist.get_rank()}.pt"
    set_rng_state(torch.load(rng if rng.is_file() else directory / "rng-0.pt", weights_only=True))


def save_engine_state(engine: Any, directory: Path) -> None:
    """Every rank: the DeepSpeed engine's checkpoint (its partitions of the weights and of the
    optimizer state, and its step counters) and this rank's RNG state, into ``directory``."""
    engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
    save_rank_rng(directory)


def load_engine_state(engine: Any, directory: Path) -> None:
    """Every rank: load what ``save_engine_state`` wrote into the prepared engine (weights,
    optimizer state; the learning-rate schedule is prefixpo's own, in training_state.pt)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory.parent} has no DeepSpeed state ({directory.name}/); it was not saved "
                                "under DeepSpeed")
    path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load its checkpoint from {directory}")
    load_rank_rng(directory)


def checkpoint_sharding(state: dict[str, Any]) -> str:
    """How a checkpoint's optimizer state was saved: ``none`` (whole, in training_state.pt),
    ``fsdp`` (``sharded/``) or ``deepspeed`` (``deepspeed/``). Checkpoints from before the
    ``sharding`` key are told apart by their optimizer state."""
    return state.get("sharding") or ("none" if "optimizer" in state else "fsdp")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint directory's name (``checkpoint-40``: 40), None for another name."""
    m = _CHECKPOINT.match(Path(path).name)
    return int(m.group(1)) if m else None


def locate_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """The directory ``spec`` names: itself, or for a bare name that is not a path here
    (``checkpoint-40``), that directory in ``output_dir``."""
    path = Path(spec)
    return Path(output_dir) / spec if not path.exists() and (Path(output_dir) / spec).is_dir() else path


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """``latest`` (the newest finished checkpoint in ``output_dir``) or a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest, but {output_dir} holds no finished checkpoint")
        return found[-1]
    path = locate_checkpoint(spec, output_dir)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a prefixpo checkpoint (no {STATE_FILE})")
    return path


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: a file missing, cut short or changed since it was saved."""


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "crc32": "8 hex digits"}`` of a file (CRC-32 finds damaged and truncated
    files at several GB/s; it is not a defence against deliberate changes)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": path.stat().st_size, "crc32": f"{crc:08x}"}


def write_manifest(directory: Path) -> None:
    """``directory/manifest.json``: every file under ``directory`` (subdirectories included) with its digest."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): file_digest(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=0))


def verify_checkpoint(directory: Path) -> str | None:
    """What is wrong with a checkpoint, in one line, or None when every file of its manifest is there
    with its size and CRC-32. A checkpoint written before manifests existed is not checked (None).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"abc"); write_manifest(d)
    >>> verify_checkpoint(d) is None
    True
    >>> _ = (d / "w.bin").write_bytes(b"abd"); verify_checkpoint(d).split(": ", 1)[1]
    'w.bin changed since it was saved (CRC-32 ab40d461, saved 352441c2)'
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{directory} is damaged: {MANIFEST} cannot be read ({err})"
    for name, saved in manifest.items():
        file = directory / name
        if not file.is_file():
            return f"{directory} is damaged: {name} is missing"
        now = file_digest(file)
        if now["bytes"] != saved["bytes"]:
            return f"{directory} is damaged: {name} has {now['bytes']} bytes, {saved['bytes']} when it was saved"
        if now["crc32"] != saved["crc32"]:
            return (f"{directory} is damaged: {name} changed since it was saved (CRC-32 {now['crc32']}, "
                    f"saved {saved['crc32']})")
    return None


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as err:  # cut short, or not a training state at all
        raise CheckpointError(f"{checkpoint / STATE_FILE} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); resume from another "
                              "checkpoint") from None
