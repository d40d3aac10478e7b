"""What keeps a run from being lost or silently wrong: a stop on a signal at the end of a step
(``StopSignals``), a stop before the optimizer step when training diverges (``Divergence``), a
checkpoint that is written whole or not at all (``written_whole``), and ``TrainingError``, the
one-line message ``prefixpo train`` exits with."""

from __future__ import annotations

import math
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TrainingError(RuntimeError):
    """Training stopped on purpose; the message says why and what was kept. ``exit_code``: what
    ``prefixpo train`` exits with (1; 128 + the signal's number when a signal stopped it)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before they kill a job) during
    training are remembered, not acted on at once: the loop finishes its step, saves a checkpoint
    and stops, so a checkpoint never holds a half-applied optimizer step. A second signal stops at
    once, without saving. Installed only in the main thread (where Python delivers signals).

    >>> with StopSignals() as stop:
    ...     signal.raise_signal(signal.SIGTERM)
    ...     stop.name, stop.exit_code
    ('SIGTERM', 143)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: the user means now
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or signal.SIGINT)


@dataclass
class Divergence:
    """Signs that training diverged, from where the loss and the gradient norm have been: the loss's
    level is the larger of the first step's loss and a running mean (so a loss that falls towards 0
    does not make ordinary noise look like an explosion).

    >>> guard = Divergence()
    >>> guard.check_loss(0.69, 10.0) is None and guard.update(0.69, 0.43) is None
    True
    >>> guard.check_loss(float("nan"), 10.0), guard.check_loss(9.0, 10.0), guard.check_loss(9.0, 0.0)
    ('the loss is nan', 'the loss jumped to 9, 13x its level so far (0.69; loss_spike_factor 10)', None)
    >>> guard.check_gradient(float("inf"), 0.6), guard.check_gradient(0.0, 0.01), guard.check_gradient(0.0, 0.68)[:35]
    ('the gradient norm is inf', None, 'the gradient vanished (norm 0 at th')
    """

    first_loss: float | None = None
    mean_loss: float | None = None
    first_grad: float | None = None

    def update(self, loss: float, grad_norm: float) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss
        self.first_grad = grad_norm if self.first_grad is None else self.first_grad

    def check_loss(self, loss: float, factor: float) -> str | None:
        """Why training must stop at this loss, or None: it is not finite, or (``factor`` > 0) it is
        more than ``factor`` times the level so far."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if factor and self.first_loss is not None:
            level = max(self.first_loss, self.mean_loss or 0.0)
            if level > 0 and loss > factor * level:
                return (f"the loss jumped to {loss:.4g}, {loss / level:.0f}x its level so far ({level:.4g}; "
                        f"loss_spike_factor {factor:g})")
        return None

    def check_gradient(self, grad_norm: float, loss: float) -> str | None:
        """Why training must stop at this gradient norm, or None: it is not finite, or it vanished
        (below 1e-9 of the first step's) while the loss stayed above half its first value: the
        model's outputs saturated (a far too high learning rate does this), so nothing can train."""
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        if self.first_grad and self.first_loss and grad_norm <= 1e-9 * self.first_grad \
                and loss > 0.5 * self.first_loss:
            return (f"the gradient vanished (norm {grad_norm:.3g} at this step, {self.first_grad:.3g} at the first) "
                    f"while the loss stayed at {loss:.4g}: the model's outputs saturated")
        return None


@contextmanager
def written_whole(path: Path, last_good: Path | None) -> Iterator[None]:
    """Writing ``path`` (a checkpoint's temporary directory, or ``final/``): on an OS error (a full
    disk, a quota) the partial directory is removed and the run stops with one line naming the path,
    the free space and the last good checkpoint."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)
        place = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(place).free / 2**30
        raise TrainingError(f"could not write {path} ({err.strerror or err}; {free:.1f} GiB free there); removed the "
                            f"partial {path.name}. The last good checkpoint is {last_good or 'none'}; free some space "
                            "and resume with --resume_from_checkpoint latest") from None
