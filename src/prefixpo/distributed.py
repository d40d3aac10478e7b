"""Several ranks: FSDP2 wiring for the policy and the frozen reference, and how balanced the ranks are.

The trainer runs data parallel through accelerate (DDP, FSDP2; docs/training.md). What needs care
here is FSDP2 (``torch.distributed.fsdp.fully_shard``):

- The policy is a ``ScoredLM`` around the transformers model, and it is the module FSDP wraps
  (its forward does the whole scored pass, output layer included). ``apply_fsdp_hints`` gives
  it what accelerate's FSDP2 preparation looks up on the model: the decoder layer classes to
  shard one by one (``_no_split_modules``) and ``tie_weights``, which accelerate calls after it
  moves weights through the meta device and which keeps tied embeddings one parameter.
- The frozen reference is sharded the same way (``shard_frozen``): each decoder layer, then a
  ``ScoredLM`` root, so a rank holds 1/world of it instead of a full copy.
- A sharded model's forward is a collective: every rank must run it the same number of times.
  ``reference_for_step`` runs the reference for every micro-batch, even one without pairs.
- accelerate's bf16 policy casts the wrapped module's outputs to bf16 and reduces gradients in
  bf16; ``keep_fp32_outputs`` keeps the scored log-probs and the gradient reduction in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from prefixpo.layout import Batch
from prefixpo.logprobs import ResponseLogps
from prefixpo.modeling import ScoredLM, is_scored, unwrap
from prefixpo.step import ReferenceFn


def layer_classes(model: nn.Module) -> list[str]:
    """Names of the model's decoder layer classes (transformers' ``_no_split_modules``)."""
    return list(getattr(unwrap(model), "_no_split_modules", None) or [])


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output layer's weight is the input embedding's (one parameter)."""
    inner = unwrap(model)
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a tied output layer's weight).

    ``save_pretrained`` drops them when the weights share storage, but a state dict gathered
    from FSDP shards holds separate copies, so the caller drops them by name.

    >>> from torch import nn
    >>> m = nn.ModuleDict({"embed": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
    >>> m.head.weight = m.embed.weight
    >>> tied_aliases(m)
    {'head.weight'}
    """
    kept = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept


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


def keep_fp32_outputs(plugin) -> None:
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
    from torch.distributed.fsdp import MixedPrecisionPolicy

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


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard_frozen(model: nn.Module, device: torch.device) -> ScoredLM:
    """FSDP2 for a frozen model (no optimizer): every decoder layer, then a ``ScoredLM`` root.

    The root is the ``ScoredLM`` and not the transformers model because the scored forward
    reads the output layer's weight directly (it never calls ``lm_head``): only the root's
    hooks gather the weights outside the layers (embeddings, final norm, output layer).
    Returns the sharded ``ScoredLM``; ``compute_logps`` takes it like a model.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
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


def collective(reference: ReferenceFn) -> ReferenceFn:
    """Mark a reference function whose forward runs collectives (a sharded model)."""
    reference.collective = True
    return reference


def is_collective(reference: object) -> bool:
    """Whether calling ``reference`` runs collectives, so every rank must call it alike."""
    return bool(getattr(reference, "collective", False))


def reference_for_step(reference: ReferenceFn | None, micro_batches: Sequence[Batch],
                       build_masks: Callable[[Batch], object]) -> tuple[ReferenceFn | None, list[object] | None]:
    """``(reference, masks)``: a reference whose forward is collective is run now on every
    micro-batch of the step, and the attention masks it was given are returned for
    ``preference_step`` to use again (built once per micro-batch); any other reference is returned
    as it is, with no masks (the step builds each micro-batch's masks as it goes).

    ``preference_step`` skips the reference on a micro-batch without pairs (an empty padding
    row); with a sharded reference the other ranks would then wait in its all-gathers forever.
    The results are looked up by batch when ``preference_step`` asks for them.
    """
    if reference is None or not is_collective(reference):
        return reference, None
    masks = [build_masks(mb) for mb in micro_batches]
    table: dict[int, ResponseLogps] = {id(mb): reference(mb, m) for mb, m in zip(micro_batches, masks)}

    def lookup(batch: Batch, masks: object) -> ResponseLogps:
        return table[id(batch)]

    return lookup, masks


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
