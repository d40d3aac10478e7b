"""Model FLOPs of a benchmark step and the peak they are measured against (MFU)."""

from __future__ import annotations

import torch
from torch import nn

PEAKS_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM (NVIDIA datasheet)


def model_dims(model: nn.Module) -> dict[str, int]:
    """Non-embedding parameters and the shapes that attention and lm_head FLOPs need."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    nonembedding = total - embed.numel() - (0 if head is embed else head.numel())
    heads = cfg.num_attention_heads
    return {"params_nonembedding": nonembedding, "layers": cfg.num_hidden_layers, "heads": heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "vocab": head.shape[0], "hidden": head.shape[1]}


def step_flops(dims: dict[str, int], tokens: int, attention_pairs: int, scored: int) -> float:
    """Model FLOPs of one step: policy fwd+bwd (3x forward) and reference fwd (1x) of
    ``tokens`` through the non-embedding weights (2 N per token forward), attention over the
    allowed (q, k) pairs (QK^T and PV: 4 heads head_dim per pair per layer forward), and lm_head at
    the scored tokens (2 V H per token forward).

    >>> step_flops({"params_nonembedding": 10, "layers": 2, "heads": 3, "head_dim": 4, "vocab": 5,
    ...             "hidden": 6}, tokens=7, attention_pairs=8, scored=9)
    5792.0
    """
    forward = (2 * dims["params_nonembedding"] * tokens
               + 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * attention_pairs
               + 2 * dims["vocab"] * dims["hidden"] * scored)
    return 4.0 * forward  # 3 forwards' worth for the policy, 1 for the reference


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
