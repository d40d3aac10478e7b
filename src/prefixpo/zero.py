"""DeepSpeed ZeRO through accelerate: what the training step, the reference and checkpoints need.

accelerate's ``prepare`` turns the policy (a ``ScoredLM``) into a ``DeepSpeedEngine`` and wraps
the optimizer in a wrapper whose ``step`` and ``zero_grad`` do nothing: the engine owns backward,
gradient accumulation, clipping and the optimizer step. So under DeepSpeed the trainer

- fills the DeepSpeed config keys prefixpo owns (``configure``): rows per micro-batch,
  accumulation steps, gradient clipping, and gathering the weights for saving (ZeRO-3);
- backpropagates each micro-batch through ``engine.backward`` *without* its division by the
  accumulation steps (``engine_backward``): ``preference_step`` already scales every micro-batch
  to its share of the mean over all pairs of the step (docs/design.md section 4), and the engine's
  average over ranks is the one the step expects from any data-parallel engine;
- tells the engine which micro-batch ends the step (``accumulation_boundary``, used as
  ``preference_step``'s ``no_sync``), since the last step of an epoch may have fewer;
- calls ``engine.step()`` once per optimizer step (``optimizer_step``: clip, step, zero the
  gradients) and reads the gradient norm after it.

ZeRO-3 partitions every parameter, and a module's forward hooks gather only its own. The scored
forward reads the output layer's weight outside ``lm_head.forward``, so that weight is registered
as an external parameter of the ``ScoredLM`` (``register_head``), whose hooks then gather it for
forward and backward. Reading weights outside a forward (the model checks of
``apply_prefix_attention``) happens inside ``gathered``. The frozen reference is partitioned by a
second engine without optimizer (``frozen_engine``); its forward is a collective, like the
FSDP-sharded reference.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prefixpo.config import ConfigError
from prefixpo.modeling import ScoredLM, apply_prefix_attention, is_scored, unwrap
from prefixpo.step import Backward, SyncContext


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage of a DeepSpeed run, 0 without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def _fill(node: dict, key: str, value: Any, prefixpo_key: str) -> None:
    """Set ``node[key]`` where it is absent or ``auto``; refuse a different value set by the user."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(f"the DeepSpeed config sets `{key}` to {current}, but prefixpo's `{prefixpo_key}` is "
                          f"{value}; set it to auto (or leave it out) in the DeepSpeed config, prefixpo fills it in")


def configure(config: dict, cfg: Any) -> None:
    """Fill the DeepSpeed ``config`` (accelerate's plugin's, before ``prepare``) from prefixpo's ``cfg``.

    prefixpo creates the optimizer and the learning-rate schedule itself, runs its own gradient
    accumulation over micro-batches of ``per_device_train_batch_size`` rows and clips to
    ``max_grad_norm``; ZeRO-3 must gather the weights for the transformers checkpoint.

    >>> config = {"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}
    >>> from types import SimpleNamespace as C
    >>> configure(config, C(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1.0))
    >>> config["gradient_accumulation_steps"], config["train_micro_batch_size_per_gpu"], config["gradient_clipping"]
    (4, 2, 1.0)
    >>> config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    True
    """
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"the DeepSpeed config has its own `{key}`; remove it: prefixpo creates AdamW and "
                              "the learning-rate schedule from its own config (learning_rate, lr_scheduler_type, ...)")
    _fill(config, "train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size, "per_device_train_batch_size")
    _fill(config, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "gradient_accumulation_steps")
    _fill(config, "gradient_clipping", cfg.max_grad_norm, "max_grad_norm")
    zero = config["zero_optimization"]
    if int(zero.get("stage", 0)) == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            print("note: prefixpo turns on stage3_gather_16bit_weights_on_model_save (zero3_save_16bit_model): "
                  "its checkpoints hold the whole transformers model", file=sys.stderr)
        zero["stage3_gather_16bit_weights_on_model_save"] = True


@contextmanager
def whole_model_loading(enabled: bool = True) -> Iterator[None]:
    """Inside (when ``enabled``), transformers builds and loads models whole, not partitioned by ZeRO-3.

    With a ZeRO-3 config accelerate registers it with transformers (whatever ``zero3_init_flag``
    says, in accelerate 1.15), and transformers then builds every model under
    ``deepspeed.zero.Init``. Loaded whole: a model used without an engine (the precomputed
    reference), and random weights, which ``zero.Init`` draws differently."""
    if not enabled:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


@contextmanager
def gathered(params: Iterable[torch.Tensor | None]) -> Iterator[None]:
    """Inside, ZeRO-3-partitioned parameters among ``params`` hold their whole values (read-only,
    on every rank); anything else passes through."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def apply_attention(model: nn.Module, backend: str) -> nn.Module:
    """``apply_prefix_attention`` on a model that may be ZeRO-3-partitioned (``zero3_init_flag``):
    its checks run a short forward, so the weights are gathered whole for them, once."""
    with gathered(model.parameters()):
        return apply_prefix_attention(model, backend)


def head_params(model: nn.Module) -> list[nn.Parameter]:
    """The output layer's weight (and bias), which the scored forward reads directly."""
    head = unwrap(model).get_output_embeddings()
    return [p for p in (head.weight, getattr(head, "bias", None)) if isinstance(p, nn.Parameter)]


def register_head(scored: nn.Module) -> None:
    """ZeRO-3: make the ``ScoredLM``'s hooks gather the output layer for its forward and backward."""
    if not is_scored(scored):
        raise TypeError(f"expected a ScoredLM, got {type(scored).__name__}")
    import deepspeed

    for p in head_params(scored.model):
        if hasattr(p, "ds_id"):
            deepspeed.zero.register_external_parameter(scored, p)


def frozen_engine(model: nn.Module, accelerator: Any) -> nn.Module:
    """The frozen reference partitioned by ZeRO-3: a ``ScoredLM`` in a DeepSpeed engine without an
    optimizer, built from the policy's DeepSpeed config (so call it after the policy's ``prepare``,
    which filled every ``auto``). ``compute_logps`` takes the engine like a model; its forward is
    a collective. ``model`` has prefix attention applied already."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=ScoredLM(model.requires_grad_(False).eval()), config=config)
    engine.eval()
    register_head(engine.module)
    return engine


def engine_backward(engine: Any) -> Backward:
    """``preference_step``'s ``backward`` under DeepSpeed: the engine's, without its 1/accumulation."""

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)

    return backward


def accumulation_boundary(engine: Any) -> SyncContext:
    """``preference_step``'s ``no_sync`` under DeepSpeed: marks the step's last micro-batch as the
    gradient accumulation boundary (where ZeRO-1/2 reduce and the engine may step) and the others not."""

    @contextmanager
    def context(last: bool) -> Iterator[None]:
        engine.set_gradient_accumulation_boundary(last)
        yield

    return context


def optimizer_step(engine: Any) -> float:
    """The engine's optimizer step (clipping to ``gradient_clipping``, the step, zeroing the
    gradients); returns the gradient norm before clipping, as ``clip_grad_norm_`` does."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (loaded under ``zero3_init_flag``, or
    prepared); then the engine places them, and a plain ``.to(device)`` must not."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
