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
from accelerate.utils import gather_object
from torch import nn

from prefixpo.layout import Group


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


PEAKS_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12}  # dense bf16 tensor-core peak (NVIDIA datasheets)


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """FLOP/s that MFU is measured against: ``peak_tflops`` if given, else the dense bf16 peak of a
    known GPU (``PEAKS_BF16``), else none.

    >>> peak_flops(torch.device("cpu"), 100.0), peak_flops(torch.device("cpu"))
    (100000000000000.0, None)
    """
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS_BF16.items() if k in name), None)


def model_dims(model: nn.Module) -> dict[str, int]:
    """Non-embedding parameters and the shapes that attention and output-layer FLOPs need."""
    cfg = getattr(model.config, "text_config", None) or model.config
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight

    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partition holds 0 elements; ds_numel is the whole
        return getattr(p, "ds_numel", None) or p.numel()

    total = sum(numel(p) for p in model.parameters())  # tied weights counted once
    heads = cfg.num_attention_heads
    return {"params_nonembedding": total - numel(embed) - (0 if head is embed else numel(head)),
            "layers": cfg.num_hidden_layers, "heads": heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "vocab": cfg.vocab_size, "hidden": cfg.hidden_size}


def causal_pairs(n: int) -> int:
    """Allowed (q, k) pairs of a causal sequence of ``n`` tokens: ``n (n + 1) / 2``.

    >>> causal_pairs(4)
    10
    """
    return n * (n + 1) // 2


def attention_pairs(group: Group, shared: bool = True) -> int:
    """Allowed (q, k) pairs of a group: shared, the prompt causally and every response to the prompt
    and causally to itself; separate, every prompt+response its own causal sequence.

    >>> attention_pairs(Group([1, 2], [[3, 4], [5]])), attention_pairs(Group([1, 2], [[3, 4], [5]]), shared=False)
    (13, 16)
    """
    p = len(group.prompt_ids)
    if not shared:
        return sum(causal_pairs(p + len(r)) for r in group.response_ids)
    return causal_pairs(p) + sum(len(r) * p + causal_pairs(len(r)) for r in group.response_ids)


def forward_flops(dims: dict[str, int], group: Group, shared: bool = True) -> float:
    """Model FLOPs of one forward of ``group``: its tokens through the non-embedding weights (2 N
    per token), attention over its allowed (q, k) pairs (QK^T and PV: 4 heads head_dim per pair per
    layer) and the output layer at its scored tokens (2 V H per token). Fwd+bwd is 3 forwards."""
    tokens = group.num_tokens if shared else group.num_separate_tokens
    scored = sum(len(r) for r in group.response_ids)
    return (2 * dims["params_nonembedding"] * tokens
            + 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * attention_pairs(group, shared)
            + 2 * dims["vocab"] * dims["hidden"] * scored)


def summed_over_ranks(accelerator: Any, sums: dict[str, float]) -> dict[str, float]:
    """``sums`` added up over the ranks, key by key. The ranks agree on the keys first (a rank whose
    steps had no pair holds no metric, and adds 0), so every rank reduces a tensor of one size."""
    if accelerator.num_processes == 1:
        return dict(sums)  # nothing to add, and no device round trip (which would wait for the GPU)
    keys = sorted(set().union(*gather_object([sorted(sums)])))
    if not keys:
        return {}
    values = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, "sum").tolist()))


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    count: float = 0.0
    rank_tokens: list[float] = field(default_factory=list)  # real tokens of each rank
    imbalance: dict[str, float] = field(default_factory=dict)  # sums of rank_balance's shares
    metrics: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0  # model FLOPs of every rank
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, count: float, rank_tokens: list[float], rank_seconds: list[float],
            metrics: dict[str, float], flops: float = 0.0) -> None:
        self.steps += 1
        self.flops += flops
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
