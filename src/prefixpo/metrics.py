"""What a run measures and writes: sums over the steps since the last log line (``Window``), how
balanced the ranks are, peak memory, and ``metrics.jsonl``, one JSON record per log line."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def idle_share(per_rank: Sequence[float]) -> float:
    """``1 - mean / max`` of per-rank work: the share of the step the average rank waits for the
    slowest (0 = balanced).

    >>> idle_share([4.0, 1.0])
    0.375
    """
    top = max(per_rank)
    return 1.0 - sum(per_rank) / len(per_rank) / top if top > 0 else 0.0


def rank_balance(tokens: Sequence[float], seconds: Sequence[float]) -> dict[str, float]:
    """How unequal the ranks' work was in one step: ``1 - mean / max`` over ranks of the real
    (non-padding) tokens, and of the compute time each rank spent before the optimizer step
    (the share of the step the average rank idles waiting for the slowest). 0 = balanced.

    >>> rank_balance([100, 50], [2.0, 1.0])
    {'rank_token_imbalance': 0.25, 'slowest_rank_idle': 0.25}
    """
    return {"rank_token_imbalance": idle_share(tokens), "slowest_rank_idle": idle_share(seconds)}


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    count: float = 0.0
    rank_tokens: list[float] = field(default_factory=list)  # real tokens of each rank
    imbalance: dict[str, float] = field(default_factory=dict)  # sums of rank_balance's shares
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, count: float, rank_tokens: list[float], rank_seconds: list[float],
            metrics: dict[str, float]) -> None:
        self.steps += 1
        self.loss += loss
        self.count += count
        self.rank_tokens = [a + b for a, b in zip(self.rank_tokens or [0.0] * len(rank_tokens), rank_tokens)]
        for k, v in rank_balance(rank_tokens, rank_seconds).items():
            self.imbalance[k] = self.imbalance.get(k, 0.0) + v
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def balance(self) -> dict[str, Any]:
        """Per-rank real tokens, and the per-step imbalance shares averaged over the window."""
        return {"rank_tokens": [int(t) for t in self.rank_tokens],
                **{k: v / max(self.steps, 1) for k, v in self.imbalance.items()}}

    def pause(self, seconds: float) -> None:
        """Leave out of the throughput time spent on something else (saving, evaluating)."""
        self.started += seconds


def memory(device: torch.device) -> dict[str, float]:
    """This rank's peak GPU memory so far, in GiB (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def write_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the lines written after the checkpoint's step."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
