"""A run directory belongs to one run: what it holds, and whether a stage starts, resumes or skips.

``prefixpo train`` decides for every stage before anything loads (``plan_stages``):

- no ``resume_from_checkpoint``: a new run. An ``output_dir`` that already holds a run (metrics,
  checkpoints, a final model) is refused unless ``overwrite_output_dir`` is set, which removes
  what the old run wrote when the stage starts (nothing else in the directory is touched);
- ``latest``: resume the newest finished checkpoint; an error when there is none, except in a
  multi-stage run whose earlier stage was resumed or finished (the stage had not saved yet);
- ``auto``: ``latest`` when there is a checkpoint, else a new run (for job scripts that are
  requeued with the same command);
- a finished stage is skipped, unless ``max_steps`` (or ``num_train_epochs``) was raised: then it
  continues from its newest checkpoint to the new end.

A resumed stage must be the run its checkpoint comes from: every checkpoint keeps the config it
was saved under (``training_config.yaml``), and a resume whose config differs in a key outside
``RESUME_MAY_CHANGE`` (the learning rate, the loss, the batch, the data, ...) is refused, naming
the keys; the keys that may change are listed in a note. A checkpoint named without its directory
(``checkpoint-40``) is looked up in ``output_dir``; resuming one that has later checkpoints beside
it is refused (they belong to the run being replaced, and ``latest`` would pick them up).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefixpo.checkpoint import STATE_FILE, checkpoint_step, list_checkpoints, locate_checkpoint
from prefixpo.errors import ConfigError
from prefixpo.train_config import TrainConfig

DONE_MARKER = "training_done.json"
RUN_CONFIG = "training_config.yaml"  # in each checkpoint: the config it was saved under
# keys a resumed run may set otherwise than its checkpoint's run: where and how often it logs,
# saves and evaluates, how long it trains, and how it computes (not what)
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "disable_progress_bar", "torch_num_threads", "dataset_num_proc",
    "per_device_eval_batch_size", "eval_dataset", "eval_split", "generate_during_eval", "num_generations",
    "max_new_tokens", "loss_spike_factor", "num_train_epochs", "max_steps", "gradient_checkpointing",
    "activation_offloading", "torch_compile", "torch_compile_dynamic", "torch_compile_mode",
    "torch_compile_eager_numerics", "attention_backend", "logps_chunk_size", "packing", "packing_capacity",
    "packing_num_buckets", "prefix_sharing",
    # the batch may be split otherwise (an out-of-memory's fix) if the pairs per step stay: checked apart
    "per_device_train_batch_size", "gradient_accumulation_steps"})
PATH_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "dataset", "eval_dataset")
LOCK_FILE = ".prefixpo.lock"
# what a run writes into its output_dir (config.yaml alone is no run: it is written before anything loads)
RUN_FILES = ("metrics.jsonl", "final", DONE_MARKER, "samples", "curves.png", "config.yaml")
RUN_PATTERNS = ("checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*", "events.out.tfevents.*")


@dataclass
class RunState:
    """What ``path`` holds of a run: finished checkpoints (oldest first), the done marker's record,
    and the names of every file or directory a run writes."""

    path: Path
    checkpoints: list[Path]
    done: dict[str, Any] | None
    written: list[str]

    @property
    def holds_run(self) -> bool:
        return any(name != "config.yaml" for name in self.written)

    def describe(self) -> str:
        """``finished at step 40: final/, 2 checkpoints`` or ``unfinished: metrics.jsonl, 1 checkpoint``."""
        parts = [name + "/" if (self.path / name).is_dir() else name for name in self.written
                 if not name.startswith(("checkpoint-", ".tmp-", ".old-", "events.")) and name != "config.yaml"]
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint{'s' * (len(self.checkpoints) > 1)} "
                         f"(newest {self.checkpoints[-1].name})")
        head = f"finished at step {self.done.get('steps')}" if self.done else "unfinished"
        return f"{head}: {', '.join(parts)}"


def inspect_run(path: str | Path) -> RunState:
    path = Path(path)
    if not path.is_dir():
        return RunState(path, [], None, [])
    written = [name for name in RUN_FILES if (path / name).exists()]
    written += sorted(p.name for pattern in RUN_PATTERNS for p in path.glob(pattern))
    done = None
    if (path / DONE_MARKER).is_file():
        try:
            done = json.loads((path / DONE_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
    return RunState(path, list_checkpoints(path), done, written)


def clear_run(path: str | Path) -> None:
    """Remove what a run wrote into ``path`` (``RUN_FILES``, checkpoints, tensorboard events); the
    directory and anything else in it stay."""
    state = inspect_run(path)
    for name in state.written:
        target = state.path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def finished_record(cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """What the done marker records: the steps trained and the length settings they came from."""
    return {"steps": steps, "max_steps": cfg.max_steps, "num_train_epochs": cfg.num_train_epochs}


def asks_for_more(cfg: TrainConfig, done: dict[str, Any]) -> bool:
    """Whether ``cfg`` trains past a finished run: a larger ``max_steps``, or (without max_steps)
    more ``num_train_epochs`` than the run was given."""
    if cfg.max_steps > 0:
        return cfg.max_steps > int(done.get("steps") or 0)
    epochs = done.get("num_train_epochs")
    return done.get("max_steps", -1) <= 0 and epochs is not None and cfg.num_train_epochs > epochs


@dataclass
class StagePlan:
    """``action``: ``start``, ``resume`` (from ``checkpoint``: a path or ``latest``) or ``skip``;
    ``note``: one line for the user, or None; ``clear``: remove the old run's files first."""

    action: str
    checkpoint: str | None = None
    note: str | None = None
    clear: bool = False


def resume_changes(cfg: TrainConfig, checkpoint: Path) -> str | None:
    """A note of the keys that ``cfg`` sets otherwise than the run that saved ``checkpoint`` (None
    when none, or for a checkpoint without its config); ``ConfigError`` when a key outside
    ``RESUME_MAY_CHANGE`` differs, since the resumed steps would then belong to another run."""
    saved_path = checkpoint / RUN_CONFIG
    if not saved_path.is_file():
        return None
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    changed = [k for k in now if k in saved and not _same(k, saved[k], now[k])]

    def shown(keys: list[str]) -> str:
        return ", ".join(f"{k} {_short(saved[k])} -> {_short(now[k])}" for k in keys)

    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pairs = {name: c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] * w
             for name, c, w in (("saved", saved, saved.get("world_size", 1)), ("now", now, world))}
    if pairs["saved"] != pairs["now"]:
        raise ConfigError(
            f"resume_from_checkpoint {checkpoint.name}: the checkpoint's run trained {pairs['saved']} pairs a step "
            f"(per_device_train_batch_size x gradient_accumulation_steps x {saved.get('world_size', 1)} processes), "
            f"this config {pairs['now']} ({now['per_device_train_batch_size']} x {now['gradient_accumulation_steps']} "
            f"x {world}); keep the pairs per step (e.g. a smaller batch with more accumulation), or start a new run "
            f"from its weights in another output_dir (model_name_or_path: {checkpoint})")
    if refused:
        raise ConfigError(
            f"resume_from_checkpoint {checkpoint.name}: this config changes what the checkpoint's run trained "
            f"with ({shown(refused)}); resume with that run's settings ({saved_path}), or start a new run from its "
            f"weights in another output_dir (model_name_or_path: {checkpoint})")
    noted = [k for k in changed if k not in ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")]
    return f"resuming {checkpoint.name} with changed settings: {shown(noted)}" if noted else None


def _same(key: str, saved: Any, now: Any) -> bool:
    """Whether a key's saved and current values mean the same run: a local path given relative one
    time and absolute the other is the same path; where the data is cached is not the data."""
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(now, str) and os.path.exists(saved) \
            and os.path.exists(now):
        return os.path.realpath(saved) == os.path.realpath(now)
    if key == "data" and isinstance(saved, dict) and isinstance(now, dict):
        from prefixpo.data.config import NOT_THE_DATA  # (prefixpo.data loads datasets: on resume only)

        return {k: v for k, v in saved.items() if k not in NOT_THE_DATA} == \
            {k: v for k, v in now.items() if k not in NOT_THE_DATA}
    return saved == now


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plan_stage(cfg: TrainConfig, continuing: bool = False) -> StagePlan:
    """What ``prefixpo train`` does with ``cfg``'s stage. ``continuing``: an earlier stage of the
    same run was resumed or skipped as finished. Raises ``ConfigError`` when the directory's run
    would be overwritten or there is nothing to resume."""
    state, resume, out = inspect_run(cfg.output_dir), cfg.resume_from_checkpoint, cfg.output_dir
    name = f"stage {cfg.stage} in {out}"
    if resume is None:
        if state.holds_run and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {out} already holds a run ({state.describe()}); continue it with "
                              "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
                              "another output_dir")
        return StagePlan("start", clear=state.holds_run)
    if resume not in ("latest", "auto"):
        path = locate_checkpoint(resume, out)
        step = checkpoint_step(path) if (path / STATE_FILE).is_file() else None  # else: check_stages names it
        beside = step is not None and path.parent.resolve() == Path(out).resolve()
        later = [c.name for c in state.checkpoints if beside and checkpoint_step(c) > step]
        if later:
            raise ConfigError(f"resume_from_checkpoint {path.name}: {out} holds later checkpoints ({', '.join(later)}) "
                              "of the run this resume would replace, which `latest` would pick up again; move or "
                              "delete them first, or resume from latest")
        return StagePlan("resume", str(path), note=resume_changes(cfg, path))
    if state.done is not None:
        if not asks_for_more(cfg, state.done):
            return StagePlan("skip", note=f"{name} already finished at step {state.done.get('steps')}; skipping "
                                          "(raise max_steps or num_train_epochs to train it further)")
        if not state.checkpoints:
            raise ConfigError(f"{name} finished at step {state.done.get('steps')} and kept no checkpoint to continue "
                              f"from (set save_steps to keep one); train further in a new output_dir with "
                              f"--model_name_or_path {Path(out) / 'final'}")
        changes = resume_changes(cfg, state.checkpoints[-1])
        return StagePlan("resume", str(state.checkpoints[-1]),
                         note=f"{name} finished at step {state.done.get('steps')}; continuing from "
                              f"{state.checkpoints[-1].name} to the new end" + (f"\n{changes}" if changes else ""))
    if state.checkpoints:
        return StagePlan("resume", str(state.checkpoints[-1]), note=resume_changes(cfg, state.checkpoints[-1]))
    if resume == "auto" or continuing:
        return StagePlan("start", note=f"{name}: no checkpoint to resume; starting it", clear=state.holds_run)
    raise ConfigError(f"resume_from_checkpoint latest: {out} holds no finished checkpoint to resume"
                      + (f" ({state.describe()})" if state.holds_run else "")
                      + "; start without --resume_from_checkpoint, or use `auto` to resume when there is a "
                      "checkpoint and start fresh when there is none")


def plan_stages(stages: list[TrainConfig]) -> list[StagePlan]:
    """``plan_stage`` for every stage of a run, in order, so a problem in a later stage is reported
    before the first one trains."""
    plans: list[StagePlan] = []
    for cfg in stages:
        plans.append(plan_stage(cfg, continuing=any(p.action in ("resume", "skip") for p in plans)))
    return plans


class RunLock:
    """One run at a time writes into an ``output_dir``: an exclusive ``flock`` on
    ``output_dir/.prefixpo.lock``, held while a stage trains. The operating system lets it go when
    the process ends, however it ends, so a killed run never leaves a stale lock. ``held`` is false
    where there is nothing to lock: a process other than the main one of a launched run, or a system
    without ``fcntl``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunLock(d) as lock:
    ...     try:
    ...         RunLock(d).__enter__()
    ...     except ConfigError as err:
    ...         print(str(err).split(" (")[0], "|", lock.held)
    another run is writing to this output_dir | True
    """

    def __init__(self, output_dir: str | Path, main: bool = True):
        self.path = Path(output_dir) / LOCK_FILE
        self.main = main
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return self
        if not self.main:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another run is writing to this output_dir ({holder}; lock {self.path}): wait for it "
                              "to end, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None
