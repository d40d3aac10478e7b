"""One process, or data parallel (DDP) through accelerate: the base engine (``prefixpo.engine``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixpo.checkpoint import set_rng_state
from prefixpo.config import TrainConfig
from prefixpo.modeling import apply_prefix_attention, tied_aliases

GradientCheck = Callable[[float], "str | None"]  # why the step must not be taken at this gradient norm, or None


class Engine:
    """One process, or data parallel (DDP) through accelerate: every rank holds the whole model and
    optimizer; checkpoints keep the optimizer state whole in ``training_state.pt``."""

    name = "none"  # what a checkpoint records as its ``sharding``
    description = "without FSDP or DeepSpeed"
    zero3 = False

    def __init__(self, accelerator: Any, cfg: TrainConfig) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.device: torch.device = accelerator.device
        self.world = accelerator.num_processes
        self.policy: nn.Module | None = None
        self.optimizer: Any = None
        self.params: list[nn.Parameter] = []
        self.aliases: set[str] = set()

    # --- models -----------------------------------------------------------------------------

    def loading(self, whole: bool, reference: bool = False) -> AbstractContextManager:
        """Around loading a model: ``whole`` for random weights or a model used without an engine;
        ``reference`` for the frozen reference (loaded on every rank)."""
        return nullcontext()

    def master_weights(self) -> bool:
        """Whether the trainable parameters are upcast to fp32 (bf16 compute under autocast)."""
        return self.cfg.bf16 and self.cfg.fp32_master_weights and not self.cfg.load_in_4bit

    def place(self, model: nn.Module) -> nn.Module:
        """On this rank's device (a quantized model is placed when it loads)."""
        return model if self.cfg.load_in_4bit else model.to(self.device)

    def apply_attention(self, model: nn.Module) -> nn.Module:
        return apply_prefix_attention(model, self.cfg.attention_backend)

    def prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """accelerate's ``prepare`` of the policy (a ``ScoredLM``) and its optimizer; returns the policy."""
        self.aliases = tied_aliases(getattr(policy, "_orig_mod", policy).model)  # named as in the model
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        return self.policy

    def inner(self) -> nn.Module:
        """The transformers model inside the prepared policy."""
        return self.accelerator.unwrap_model(self.policy).model

    def shard_reference(self, model: nn.Module) -> tuple[nn.Module, bool]:
        """The frozen reference as this engine runs it, and whether its forward is a collective."""
        return model, False

    # --- the step ---------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, last: bool) -> AbstractContextManager:
        """Around a micro-batch: data-parallel gradients are reduced on the step's last one only."""
        return nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.policy)

    def clip_and_step(self, check: GradientCheck) -> tuple[float, str | None]:
        """Clip to ``max_grad_norm`` (0: no clipping; the norm is still measured), then the optimizer
        step unless ``check`` finds a reason not to: ``(gradient norm, reason or None)``."""
        norm = float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm or math.inf))
        problem = check(norm)
        if not problem:
            self.optimizer.step()
        return norm, problem

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints ------------------------------------------------------------------------

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The transformers model's full state dict without tied aliases; every rank calls it
        (sharded engines gather to the main process; DeepSpeed gives the others nothing)."""
        state = self.accelerator.get_state_dict(self.policy) or {}
        weights = {k.removeprefix("model."): v for k, v in state.items()}
        return {k: v for k, v in weights.items() if k not in self.aliases}

    def checkpoint_state(self) -> dict[str, Any]:
        """What ``training_state.pt`` holds of this engine (the whole optimizer state)."""
        return {"optimizer": self.optimizer.state_dict()}

    def save_state(self, directory: Path) -> None:
        """Every rank: its own part of a checkpoint, into the temporary ``directory``."""

    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Every rank: the optimizer and RNG state of ``checkpoint`` (``state``: its training_state.pt)."""
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
