"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate, for the policy and the frozen reference.

- The policy is a ``ScoredLM`` around the transformers model, and it is the module FSDP wraps
  (its forward does the whole scored pass, output layer included). ``apply_fsdp_hints`` gives
  it what accelerate's FSDP2 preparation looks up on the model: the decoder layer classes to
  shard one by one (``_no_split_modules``) and ``tie_weights``, which accelerate calls after it
  moves weights through the meta device and which keeps tied embeddings one parameter.
- The frozen reference is sharded the same way (``shard_frozen``): each decoder layer, then a
  ``ScoredLM`` root, so a rank holds 1/world of it instead of a full copy. Its forward is a
  collective: every rank runs it on every micro-batch (``prefixpo.reference.reference_for_step``).
- accelerate's bf16 policy casts the wrapped module's outputs to bf16 and reduces gradients in
  bf16; ``keep_fp32_outputs`` keeps the scored log-probs and the gradient reduction in fp32.
- Checkpoints: every rank writes its optimizer shard and RNG state (``sharded/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from prefixpo.checkpoint import SHARDED_DIR, load_sharded_state, save_sharded_state
from prefixpo.config import ConfigError
from prefixpo.engine.plain import Engine
from prefixpo.guards import TrainingError
from prefixpo.modeling import ScoredLM, is_scored, tied_embeddings, unwrap


def layer_classes(model: nn.Module) -> list[str]:
    """Names of the model's decoder layer classes (transformers' ``_no_split_modules``)."""
    return list(getattr(unwrap(model), "_no_split_modules", None) or [])


def apply_fsdp_hints(policy: ScoredLM) -> ScoredLM:
    """Give the ``ScoredLM`` wrapper the attributes accelerate's FSDP2 ``prepare`` reads from a
    transformers model: ``_no_split_modules`` (else no layer is sharded on its own and the whole
    model is gathered at once) and ``tie_weights`` (else tied embeddings come out of its
    meta-device loading as two parameters, one of them outside the optimizer)."""
    if not is_scored(policy):
        raise TypeError(f"expected a ScoredLM, got {type(policy).__name__}")
    policy._no_split_modules = layer_classes(policy.model)
    inner = unwrap(policy.model)
    if hasattr(inner, "tie_weights"):
        policy.tie_weights = inner.tie_weights
    return policy


def keep_fp32_outputs(plugin: Any) -> None:
    """Adjust accelerate's FSDP2 mixed precision policy (in place, before ``prepare``): bf16
    compute stays, but forward outputs are not cast and gradients are reduced in fp32.

    accelerate's ``bf16`` policy sets ``output_dtype`` and ``reduce_dtype`` to bf16. The policy's
    output is the ``ScoredLM``'s fp32 token log-probs: in bf16 each keeps ~3 significant digits,
    and summed per response in bf16 they stop growing at a few thousand nats (-7 + -4096 rounds
    to -4096), so policy and reference, which is not cast, disagree from step 1. A bf16 gradient
    reduction would also round the cross-rank mean of the loss (docs/design.md section 4).

    ``plugin``: the ``FullyShardedDataParallelPlugin`` (``accelerator.state.fsdp_plugin``).
    """
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is None or getattr(plugin, "fsdp_version", 1) != 2:
        return
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None,
        cast_forward_inputs=policy.cast_forward_inputs)


@contextmanager
def every_rank_loads_weights() -> Iterator[None]:
    """Load a model whole on every rank, whatever ``fsdp_cpu_ram_efficient_loading`` says.

    With that option transformers leaves the weights empty on all but local rank 0, counting on
    accelerate's ``prepare`` to broadcast them; the frozen reference is not prepared by
    accelerate, so it would keep empty weights on the other ranks.
    """
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def shard_frozen(model: nn.Module, device: torch.device) -> ScoredLM:
    """FSDP2 for a frozen model (no optimizer): every decoder layer, then a ``ScoredLM`` root.

    The root is the ``ScoredLM`` and not the transformers model because the scored forward
    reads the output layer's weight directly (it never calls ``lm_head``): only the root's
    hooks gather the weights outside the layers (embeddings, final norm, output layer).
    Returns the sharded ``ScoredLM``; ``compute_logps`` takes it like a model.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    scored = ScoredLM(model.requires_grad_(False).eval())
    names = set(layer_classes(model))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(unwrap(model)).__name__} names no decoder layer class (_no_split_modules) "
                         "to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(scored, mesh=mesh, reshard_after_forward=True)
    return scored


class FSDPEngine(Engine):
    """FSDP2: parameters, gradients and optimizer state sharded over ranks; fp32 master weights."""

    name = "fsdp"
    description = "with FSDP"

    def __init__(self, accelerator: Any, cfg: Any) -> None:
        super().__init__(accelerator, cfg)
        if not accelerator.is_fsdp2:
            raise ConfigError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                              "(examples/accelerate/fsdp2.yaml)")
        keep_fp32_outputs(accelerator.state.fsdp_plugin)

    def loading(self, whole: bool, reference: bool = False) -> AbstractContextManager:
        return every_rank_loads_weights() if reference else nullcontext()

    def master_weights(self) -> bool:  # FSDP2's mixed precision keeps fp32 parameters itself
        return self.cfg.bf16 and not self.cfg.load_in_4bit

    def prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        tied = tied_embeddings(policy)
        super().prepare(apply_fsdp_hints(policy), optimizer)
        if tied and not tied_embeddings(self.accelerator.unwrap_model(self.policy)):
            raise TrainingError("the model's tied input and output embeddings became two parameters when the "
                                   "model was prepared; set fsdp_cpu_ram_efficient_loading: false in the "
                                   "accelerate config")
        return self.policy

    def shard_reference(self, model: nn.Module) -> tuple[nn.Module, bool]:
        return shard_frozen(model, self.device), True

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def save_state(self, directory: Path) -> None:
        save_sharded_state(self.policy, self.optimizer.optimizer, directory / SHARDED_DIR)

    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        load_sharded_state(self.policy, self.optimizer.optimizer, checkpoint / SHARDED_DIR)
