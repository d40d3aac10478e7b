"""Model FLOPs of a benchmark step (the model's shapes and the device's peak: ``prefixpo.metrics``)."""

from __future__ import annotations


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
