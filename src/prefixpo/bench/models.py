"""The benchmark's models: a model shape of the profiles file, a policy with random weights and a
frozen copy as reference, and the attention and compilation each mode runs with."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from prefixpo.modeling import apply_prefix_attention, decoder_of, load_model, remove_prefix_attention


def model_config(name: str, profiles: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a key of the profiles' ``models`` or a config JSON path."""
    if name in profiles.get("models", {}):
        spec = dict(profiles["models"][name])
        model_type = spec.pop("architecture").removesuffix("ForCausalLM").lower()
    elif name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            spec = json.load(f)
        model_type = spec.pop("model_type")
    else:
        raise ValueError(f"unknown model {name!r}: give a key of the profiles' models "
                         f"({', '.join(profiles.get('models', {}))}) or a config JSON path")
    return AutoConfig.for_model(model_type, **spec)


def build_models(config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Policy (random weights from ``seed``, built on ``device``) and a frozen copy as reference."""
    policy = load_model(config, dtype=dtype, seed=seed, device=device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy.train(), reference


def set_mode_attention(models: Sequence[nn.Module], mode: str, backend: str) -> None:
    """transformers' own ``sdpa`` for ``separate``; prefixpo's attention with ``backend`` otherwise."""
    for m in models:
        remove_prefix_attention(m, "sdpa")  # plain sdpa first: apply's output-head check runs on it
        if mode != "separate":
            apply_prefix_attention(m, backend, self_check=False)


def set_compiled(models: Sequence[nn.Module], on: bool) -> None:
    """``torch.compile`` every decoder layer (static shapes: one graph per bucketed row length, as
    symbolic lengths made FlexAttention 1.8x slower, docs/benchmarks.md), or switch back to eager.

    Each layer is compiled once; switching keeps the compiled forward aside (``nn.Module.compile``
    stores it in ``_compiled_call_impl``), so a mode that runs eager costs no recompilation later."""
    for m in models:
        for layer in decoder_of(m).layers:
            if on and getattr(layer, "_prefixpo_compiled", None) is None:
                layer.compile(dynamic=False)
                layer._prefixpo_compiled = layer._compiled_call_impl
            layer._compiled_call_impl = getattr(layer, "_prefixpo_compiled", None) if on else None
