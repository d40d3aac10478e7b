"""DeepSpeed ZeRO through accelerate.

accelerate's ``prepare`` turns the policy (a ``ScoredLM``) into a ``DeepSpeedEngine`` and wraps
the optimizer in a wrapper whose ``step`` and ``zero_grad`` do nothing: the engine owns backward,
gradient accumulation, clipping and the optimizer step. So under DeepSpeed prefixpo

- fills the DeepSpeed config keys it owns (``configure``): rows per micro-batch, accumulation
  steps, gradient clipping, and gathering the weights for saving (ZeRO-3);
- backpropagates each micro-batch through ``engine.backward`` *without* its division by the
  accumulation steps: ``preference_step`` already scales every micro-batch to its share of the
  mean over all pairs of the step (docs/design.md section 4), and the engine's average over ranks
  is the one the step expects from any data-parallel engine;
- tells the engine which micro-batch ends the step (``no_sync``), since the last step of an
  epoch may have fewer;
- calls ``engine.step()`` once per optimizer step (clip, step, zero the gradients) and reads the
  gradient norm after it.

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
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixpo.checkpoint import DEEPSPEED_DIR, load_engine_state, save_engine_state
from prefixpo.config import ConfigError
from prefixpo.engine.plain import Engine, GradientCheck
from prefixpo.modeling import ScoredLM, apply_prefix_attention, is_scored, unwrap
from prefixpo.step import Backward, SyncContext


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


def frozen_engine(model: nn.Module, config: dict) -> nn.Module:
    """The frozen reference partitioned by ZeRO-3: a ``ScoredLM`` in a DeepSpeed engine without an
    optimizer, built from the policy's DeepSpeed ``config`` (after the policy's ``prepare``, which
    filled every ``auto``). ``compute_logps`` takes the engine like a model; its forward is a
    collective. ``model`` has prefix attention applied already."""
    import deepspeed

    config = {k: v for k, v in copy.deepcopy(config).items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=ScoredLM(model.requires_grad_(False).eval()), config=config)
    engine.eval()
    register_head(engine.module)
    return engine


def engine_backward(engine: Any) -> Backward:
    """A step's ``backward`` under DeepSpeed: the engine's, without its 1/accumulation."""

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)

    return backward


def accumulation_boundary(engine: Any) -> SyncContext:
    """A step's ``no_sync`` under DeepSpeed: marks the step's last micro-batch as the gradient
    accumulation boundary (where ZeRO-1/2 reduce and the engine may step) and the others not."""

    @contextmanager
    def context(last: bool) -> Iterator[None]:
        engine.set_gradient_accumulation_boundary(last)
        yield

    return context


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (loaded under ``zero3_init_flag``, or
    prepared); then the engine places them, and a plain ``.to(device)`` must not."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3: the engine keeps fp32 master weights in its optimizer (bf16 in its config)."""

    name = "deepspeed"
    description = "with DeepSpeed"

    def __init__(self, accelerator: Any, cfg: Any) -> None:
        super().__init__(accelerator, cfg)
        if cfg.load_in_4bit:
            raise ConfigError("config key `load_in_4bit`: QLoRA is not supported under DeepSpeed; run it on one "
                              "GPU or with DDP (examples/accelerate/ddp.yaml)")
        self.config = accelerator.state.deepspeed_plugin.deepspeed_config
        configure(self.config, cfg)  # before the model loads
        # accelerate's own count, which it compares with the DeepSpeed config's (and warns)
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self.zero3 = int(self.config["zero_optimization"]["stage"]) == 3

    def loading(self, whole: bool, reference: bool = False) -> AbstractContextManager:
        return whole_model_loading(whole)

    def master_weights(self) -> bool:
        return False

    def place(self, model: nn.Module) -> nn.Module:
        return model if is_partitioned(model) else model.to(self.device)

    def apply_attention(self, model: nn.Module) -> nn.Module:
        """Its checks run a short forward, so a partitioned model's weights are gathered whole for them, once."""
        with gathered(model.parameters()):
            return apply_prefix_attention(model, self.cfg.attention_backend)

    def prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        super().prepare(policy, optimizer)
        if self.zero3:  # the scored forward reads the output layer's (partitioned) weight
            register_head(self.accelerator.unwrap_model(self.policy))
        self.backward, self.no_sync = engine_backward(self.policy), accumulation_boundary(self.policy)
        return self.policy

    def shard_reference(self, model: nn.Module) -> tuple[nn.Module, bool]:
        if self.zero3:
            return frozen_engine(model, self.config), True
        return self.place(model), False  # ZeRO-1/2 keep a whole copy per rank

    def clip_and_step(self, check: GradientCheck) -> tuple[float, str | None]:
        """The engine clips (``gradient_clipping``), steps and zeroes the gradients; its norm comes after."""
        self.policy.step()
        norm = self.policy.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, check(norm)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def save_state(self, directory: Path) -> None:
        save_engine_state(self.policy, directory / DEEPSPEED_DIR)

    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        load_engine_state(self.policy, checkpoint / DEEPSPEED_DIR)
