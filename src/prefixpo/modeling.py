"""Wiring the prefix-sharing mask into Hugging Face causal LMs (docs/design.md section 3).

``apply_prefix_attention(model, backend)`` checks the model, gives it a config of its own and
routes its attention through one of two functions registered with transformers'
``AttentionInterface``:

- ``prefixpo_dense``: a dense boolean mask through ``scaled_dot_product_attention`` (CPU
  training, and the oracle in tests);
- ``prefixpo_flex``: a FlexAttention ``BlockMask`` (the CUDA default; forward only on CPU).

The mask always goes to the model explicitly, built by ``build_attention_masks`` from the
batch, together with ``position_ids``: nothing relies on transformers guessing where packed
sequences begin. Masks carry the sliding window they were built for, and the attention
functions refuse a mask built for another window than the layer uses.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prefixpo.layout import Batch, collate_groups
from prefixpo.logprobs import (
    DEFAULT_CHUNK_SIZE,
    ResponseLogps,
    head_logits,
    reduce_per_response,
    scored_token_log_sum_sq,
    scored_token_logprobs,
)
from prefixpo.masks import dense_mask, flex_block_mask
from prefixpo.oracle import TOLERANCES, random_groups, separate_logps

BACKENDS = ("sdpa", "flex")
ATTENTION_FUNCTIONS = {"sdpa": "prefixpo_dense", "flex": "prefixpo_flex"}

# Architectures whose shared-layout log-probs and gradients are checked against separate
# sequences in the test suite (tests/test_modeling.py).
VERIFIED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
})

_WINDOW_TAG = "_prefixpo_sliding_window"
_UNTAGGED = object()


class UnsupportedModelError(ValueError):
    """The model cannot run the prefix-shared layout; the message says what is missing."""


# --- the attention functions ------------------------------------------------------------------

def _check_mask(mask: Any, sliding_window: int | None, module: nn.Module) -> None:
    built_for = getattr(mask, _WINDOW_TAG, _UNTAGGED)
    if built_for is _UNTAGGED:
        return  # a mask transformers built itself (plain generation); it is right for its layer
    if built_for != sliding_window:
        layer = getattr(module, "layer_idx", "?")
        raise UnsupportedModelError(
            f"layer {layer} uses sliding window {sliding_window} but received a prefixpo mask built for "
            f"{built_for}; the model does not route per-layer masks as prefixpo expects")


def _repeat_kv(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    repeats = num_query_heads // x.shape[1]
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=1)


def dense_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention with a dense mask. ``query`` is ``[B, Hq, T, D]``; returns ``[B, T, Hq, D]``."""
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("attention sinks (s_aux) are not supported by prefixpo's attention")
    _check_mask(attention_mask, sliding_window, module)
    key = _repeat_kv(key, query.shape[1])
    value = _repeat_kv(value, query.shape[1])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale,
            is_causal=attention_mask is None and query.shape[2] > 1)
    else:  # logit soft-capping (Gemma 2) needs the scores themselves
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if attention_mask is None:
            attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: the first row length compiles static; a second length recompiles once with
    # symbolic lengths, and every later length reuses that kernel (docs/benchmarks.md: one
    # 23 s compile for all lengths instead of 10-30 s per length, at ~5% steady-state cost)
    return torch.compile(flex_attention, dynamic=None)


# FlexAttention tile sizes measured fastest on an H100 for head dim 64 (llama-1b's), on 8192-token
# rows packed with prefix-shared groups: forward 1.8x and backward 1.2x faster than the defaults
# (scripts/gpu_flex_tune.py, docs/benchmarks.md). Other GPUs and head dims keep the defaults.
TUNED_FLEX_OPTIONS = {
    ((9, 0), 64): {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                   "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                   "bwd_num_warps": 4, "bwd_num_stages": 3},
}


_CAPABILITY: dict[int, tuple[int, int]] = {}  # CUDA device index -> compute capability, filled outside compiled code


def _note_device(device: torch.device) -> None:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CAPABILITY:
            _CAPABILITY[index] = torch.cuda.get_device_capability(index)


def flex_kernel_options(query: torch.Tensor) -> dict[str, Any] | None:
    """Measured FlexAttention kernel options for this GPU and head dim, or None (flex's defaults)."""
    if query.device.type != "cuda":
        return None
    capability = _CAPABILITY.get(query.device.index)
    return TUNED_FLEX_OPTIONS.get((capability, query.shape[-1])) if capability else None


def flex_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, softcap: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention with a FlexAttention ``BlockMask``. ``query`` is ``[B, Hq, T, D]``; returns ``[B, T, Hq, D]``."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("attention sinks (s_aux) are not supported by prefixpo's attention")
    if dropout:
        raise UnsupportedModelError("attention dropout is not supported with the flex backend; set the "
                                    "model's attention_dropout to 0 or use attention_backend=sdpa")
    if not isinstance(attention_mask, BlockMask):
        raise UnsupportedModelError(
            "the flex backend needs the BlockMask from prefixpo.modeling.build_attention_masks; for plain "
            "generation call remove_prefix_attention(model) first")
    _check_mask(attention_mask, sliding_window, module)
    on_cpu = query.device.type == "cpu"
    if on_cpu and torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("FlexAttention has no backward pass on CPU: train on CPU with attention_backend=sdpa")
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, k):
            return softcap * torch.tanh(score / softcap)
    # inside a compiled model the call is traced into the model's graph; eager, it runs compiled alone
    inline = on_cpu or torch.compiler.is_compiling()
    attend = eager_flex_attention if inline else _compiled_flex_attention()
    out = attend(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1], kernel_options=flex_kernel_options(query))
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention_functions() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_FUNCTIONS["sdpa"], dense_attention)
    AttentionInterface.register(ATTENTION_FUNCTIONS["flex"], flex_attention)
    try:  # plain calls (generation) get the usual causal masks
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flex_attention_mask, sdpa_mask
    except ImportError:
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_FUNCTIONS["sdpa"], sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_FUNCTIONS["flex"], flex_attention_mask)


# --- checks and application -------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside data-parallel wrappers (``.module``), prefixpo's ``ScoredLM``
    (``.model``) and PEFT (``get_base_model``)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif is_scored(model):
            model = model.model
        else:
            return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The base model (embeddings, layers, final norm) that returns final hidden states."""
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) and hasattr(model, "get_decoder"):
        base = model.get_decoder()  # e.g. Gemma 3 under transformers 4.x: prefix `language_model`, attribute `model`
    if not isinstance(base, nn.Module) or base is model:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no base model under `{prefix}`: prefixpo needs a *ForCausalLM whose "
            "base model returns the final hidden states")
    return base


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output layer's weight is the input embedding's (one parameter)."""
    inner = unwrap(model)
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a tied output layer's weight).
    ``save_pretrained`` drops them when the weights share storage, but a state dict gathered
    from FSDP shards holds separate copies, so the caller drops them by name.

    >>> m = nn.ModuleDict({"embed": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
    >>> m.head.weight = m.embed.weight
    >>> tied_aliases(m)
    {'head.weight'}
    """
    kept = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` (instances of transformers' ``_no_split_modules`` classes)."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])  # FSDP2 subclasses them: the MRO
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def compile_layers(model: nn.Module, dynamic: bool = True, max_shapes: int = 64, mode: str = "default",
                   eager_numerics: bool = True) -> int:
    """``torch.compile`` every decoder layer (all layers of the model share the graph). Returns the
    number of decoder layers. ``dynamic``: one graph with a symbolic row length for every length
    (compiled once), or static shapes, one graph per row length (``prefixpo bench``'s way, a
    compile each). ``max_shapes``: graphs kept per layer before dynamo gives up compiling it.
    ``mode``: ``torch.compile``'s (``reduce-overhead`` and ``max-autotune`` replay each layer's
    kernels as CUDA graphs, which PyTorch records for each new shape and place in the step; the
    caller marks each step's start with ``torch.compiler.cudagraph_mark_step_begin``, see
    ``uses_cuda_graphs``).
    ``eager_numerics``: low-precision (bf16, fp16) results rounded after each operation, as the
    uncompiled model rounds them (inductor's ``emulate_precision_casts``), instead of kept in fp32
    through a fused kernel. The training graph (which saves activations for the backward) and the
    no-gradient graph fuse differently, so without it a policy and a reference with the same
    weights round differently and disagree at step 1."""
    import torch._dynamo
    import torch._inductor

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), max_shapes))
    options = torch._inductor.list_mode_options(mode, dynamic)  # what torch.compile(mode=...) applies
    if "emulate_precision_casts" in torch._inductor.list_options():
        options["emulate_precision_casts"] = eager_numerics
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic, options=options)
    return len(layers)


def uses_cuda_graphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def architecture_of(model: nn.Module) -> str:
    return type(unwrap(model)).__name__


def check_model(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` naming what the model lacks for the prefix-shared layout."""
    name = architecture_of(model)
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder; prefixpo trains decoder-only causal LMs")
    base = decoder_of(model)
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise UnsupportedModelError(f"{name}'s forward takes no position_ids, which every response needs "
                                    "to restart at the prompt length")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so it cannot take "
            "the prefix-sharing mask (no `_supports_attention_backend`)")
    for layer_type in getattr(config, "layer_types", None) or ():
        if layer_type not in ("full_attention", "sliding_attention"):
            raise UnsupportedModelError(f"{name} has layers of type {layer_type!r}; prefixpo supports "
                                        "full_attention and sliding_attention layers")


def _unshare_config(model: nn.Module) -> None:
    """Give ``model`` (and every submodule holding it) a private copy of its config.

    Policy and reference models loaded from one config object would otherwise switch their
    attention together.
    """
    old = model.config
    new = copy.deepcopy(old)
    subconfigs = {id(old): new}
    for key, value in vars(old).items():
        if hasattr(value, "to_dict") and hasattr(new, key):
            subconfigs[id(value)] = getattr(new, key)
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) in subconfigs:
            module.config = subconfigs[id(cfg)]


def set_attention_function(model: nn.Module, name: str) -> None:
    """Route ``model``'s attention (and that of its sub-configs, e.g. a multimodal model's text
    config) through the transformers attention function registered as ``name``."""
    configs = [model.config] + [v for v in vars(model.config).values() if hasattr(v, "_attn_implementation")]
    for cfg in configs:
        cfg._attn_implementation = name


def apply_prefix_attention(model: nn.Module, backend: str = "auto", self_check: bool = True) -> nn.Module:
    """Route ``model``'s attention through prefixpo's mask (in place; returns the model).

    ``backend`` is ``"sdpa"`` (dense mask), ``"flex"`` (BlockMask) or ``"auto"`` (flex on CUDA,
    else sdpa). Architectures outside ``VERIFIED_ARCHITECTURES`` are checked once against
    separate sequences before the switch (``self_check``), and refused if they differ.
    """
    target = unwrap(model)
    backend = resolve_backend(backend, next(model.parameters()).device)
    check_model(model)
    check_output_head(target)
    name = architecture_of(model)
    if self_check and name not in VERIFIED_ARCHITECTURES:
        warnings.warn(f"{name} is not among prefixpo's verified architectures; checking it against separate "
                      "sequences once. Run `prefixpo verify --model ...` for the full check.", stacklevel=2)
        check_against_separate(target)
    _register_attention_functions()
    _unshare_config(target)
    set_attention_function(target, ATTENTION_FUNCTIONS[backend])
    target._prefixpo_backend = backend
    return model


@torch.no_grad()
def check_against_separate(model: nn.Module, seed: int = 0) -> None:
    """A small forward-only check of an unverified architecture against separate sequences
    (``prefixpo.oracle``); raises ``UnsupportedModelError`` if the log-probs differ beyond the
    dtype's tolerance. The model's attention implementation and mode are restored afterwards."""
    original, was_training = model.config._attn_implementation, model.training
    tol = TOLERANCES[next(model.parameters()).dtype]
    groups = random_groups(model.get_output_embeddings().weight.shape[0], 2, 2, seed, max_prompt=12, max_response=8)
    model.eval()  # no dropout: both paths must see the same function
    try:
        separate = torch.stack([t.double().sum() for t in separate_logps(model, groups)])
        _register_attention_functions()
        _unshare_config(model)
        set_attention_function(model, ATTENTION_FUNCTIONS["sdpa"])
        batch = collate_groups(groups).to(next(model.parameters()).device)
        shared = compute_logps(model, batch, build_attention_masks(model, batch, "sdpa")).sums.double()
    finally:
        set_attention_function(model, original)
        model.train(was_training)
    counts = batch.response_lengths.to(shared.device)
    error = (shared - separate.to(shared.device)).abs()
    bound = torch.clamp(tol["logps_per_token"] * counts, min=tol.get("logps", 0.0))
    if bool((error > bound).any()):
        raise UnsupportedModelError(
            f"{type(model).__name__}: shared-layout log-probs differ from separate sequences "
            f"(max abs {error.max().item():.2e}); this architecture does not honour the explicit mask and "
            "position_ids prefixpo passes, so it cannot be trained with prefix sharing")


def remove_prefix_attention(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """Give the model back a standard attention implementation (for generation)."""
    target = unwrap(model)
    set_attention_function(target, attn_implementation)
    target._prefixpo_backend = None
    return model


def backend_of(model: nn.Module) -> str:
    backend = getattr(unwrap(model), "_prefixpo_backend", None)
    if backend is None:
        raise ValueError("the model has no prefix attention: call prefixpo.modeling.apply_prefix_attention first")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)} or auto")
    return backend


# --- masks and the forward pass ---------------------------------------------------------------

def layer_windows(config: Any) -> dict[str, int | None]:
    """The mask variants a model needs: layer type -> sliding window (None for full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(layer_types)}
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return {"full_attention": window}


def build_attention_masks(model: nn.Module, batch: Batch, backend: str | None = None) -> Any:
    """The masks for one batch: one mask, or a dict by layer type when layers differ.

    Build once per batch and pass to every model that sees the batch (policy and reference).
    """
    backend = backend or backend_of(model)
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    windows = layer_windows(config)
    build = flex_block_mask if backend == "flex" else dense_mask
    if backend == "flex":
        _note_device(batch.input_ids.device)
    by_window: dict[int | None, Any] = {}
    for window in windows.values():
        if window not in by_window:
            mask = build(batch, sliding_window=window)
            setattr(mask, _WINDOW_TAG, window)
            by_window[window] = mask
    masks = {layer_type: by_window[window] for layer_type, window in windows.items()}
    if len(masks) == 1 and "sliding_attention" not in masks:
        return next(iter(masks.values()))
    return masks


def forward_hidden(model: nn.Module, batch: Batch, masks: Any = None) -> torch.Tensor:
    """Final hidden states ``[rows, T, hidden]`` of the batch under the prefix-sharing mask."""
    if masks is None:
        masks = build_attention_masks(model, batch)
    return decoder_hidden(model, batch.input_ids, batch.position_ids, masks)


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                   attention_mask: Any = None) -> torch.Tensor:
    """The decoder's last hidden states ``[B, T, H]`` (after its final norm), without a cache.

    Hidden states and attentions are declined explicitly, so that a config with
    ``output_hidden_states`` or ``output_attentions`` set does not make transformers install its
    output-capturing hooks on every layer: their ContextVar breaks each compiled layer into three
    graphs, and they stay for good once installed."""
    out = decoder_of(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=False, output_hidden_states=False, output_attentions=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


# --- the output layer -------------------------------------------------------------------------

def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None, float | None]:
    """``(weight [V, H], bias [V] or None, softcap, scale)`` of the model's output layer.

    Logits are ``softcap * tanh(scale * (h @ W.T + b) / softcap)``, with either step skipped
    when its value is None: Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``
    and Granite's ``logits_scaling`` (a divisor).
    """
    target = unwrap(model)
    head = target.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(f"{type(target).__name__} has no output embedding (lm_head) to score tokens with")
    config = getattr(target.config, "text_config", None) or target.config
    scale = getattr(config, "logit_scale", None)
    if getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap, scale


@torch.no_grad()
def check_output_head(model: nn.Module, num_tokens: int = 6) -> None:
    """Check that ``output_head`` reproduces the model's own logits, so no transform is missed."""

    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0)).to(param.device)
    was_training = model.training
    model.eval()
    try:
        # two plain calls, not output_hidden_states=True (see decoder_hidden)
        expected = model(input_ids=ids, use_cache=False, output_hidden_states=False,
                         output_attentions=False).logits[0].float()
        hidden = decoder_hidden(model, ids)[0]
    finally:
        model.train(was_training)
    got = head_logits(hidden, *output_head(model))
    tolerance = 1e-3 if param.dtype == torch.float32 else 5e-2
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)
    if not error <= tolerance:
        raise UnsupportedModelError(
            f"{type(model).__name__} transforms its logits after the output layer in a way prefixpo does not "
            f"know (relative difference {error:.2e}); supported transforms: final_logit_softcapping, "
            "logit_scale, logits_scaling")


# --- scored forward ---------------------------------------------------------------------------

class ScoredLM(nn.Module):
    """A causal LM whose forward returns the log-probs ``[S]`` of a batch's scored tokens.

    The whole scored forward (layers, then the chunked output layer) runs inside one
    ``forward``, so data-parallel wrappers (DDP, FSDP) around this module see every use of every
    parameter. ``unwrap`` reaches the transformers model inside.
    """


    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, scored_index: torch.Tensor,
                scored_targets: torch.Tensor, masks=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                log_sum_sq: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = decoder_hidden(self.model, input_ids, position_ids, masks)
        weight, bias, softcap, scale = output_head(self.model)
        scored_hidden = hidden.reshape(-1, hidden.shape[-1])[scored_index]
        logps = scored_token_logprobs(scored_hidden, weight, scored_targets, bias=bias, softcap=softcap,
                                      scale=scale, chunk_size=chunk_size)
        if log_sum_sq:  # WPO: returned beside the log-probs
            return logps, scored_token_log_sum_sq(scored_hidden.detach(), weight.detach(), bias, softcap, scale,
                                                  chunk_size)
        return logps


def is_scored(model: nn.Module) -> bool:
    """Whether ``model`` is a ``ScoredLM``, also inside ``torch.compile``'s wrapper."""
    return isinstance(getattr(model, "_orig_mod", model), ScoredLM)


def compute_logps(model: nn.Module, batch: Batch, masks=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  log_sum_sq: bool = False) -> ResponseLogps:
    """The whole path: prefix-shared forward, then per-response log-probs.

    ``model`` is a transformers causal LM, or a ``ScoredLM`` (possibly inside a DDP/FSDP wrapper),
    which is then called through its own ``forward``. ``log_sum_sq``: also fill
    ``token_log_sum_sq`` (WPO's weights).
    """
    if masks is None:
        masks = build_attention_masks(model, batch)
    scorer = model if is_scored(getattr(model, "module", model)) else ScoredLM(model)
    if not log_sum_sq:
        token_logps = scorer(batch.input_ids, batch.position_ids, batch.scored_index, batch.scored_targets,
                             masks=masks, chunk_size=chunk_size)
        return reduce_per_response(token_logps, batch)
    token_logps, sum_sq = scorer(batch.input_ids, batch.position_ids, batch.scored_index, batch.scored_targets,
                                 masks=masks, chunk_size=chunk_size, log_sum_sq=True)
    out = reduce_per_response(token_logps, batch)
    out.token_log_sum_sq = sum_sq.float()
    return out


# --- loading ------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_dtype(bf16: bool) -> torch.dtype:
    """The dtype weights load in: bf16 with ``bf16`` on CUDA, else fp32 (CPU training computes in fp32)."""
    return torch.bfloat16 if bf16 and torch.cuda.is_available() else torch.float32


def is_config_file(name_or_path: str) -> bool:
    """Whether ``name_or_path`` asks for random weights: it is a model config file (``.json``).
    A directory always needs weights (``sources.check_model`` says so before anything loads)."""
    return name_or_path.endswith(".json") and os.path.isfile(name_or_path)


def load_model(source: Any, *, dtype: torch.dtype | str = torch.float32, seed: int = 0,
               device: torch.device | str | None = None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False, load_in_4bit: bool = False) -> nn.Module:
    """The one way prefixpo gets a transformers causal LM.

    ``source``: a hub name or a local directory (pretrained weights: safetensors, or ``.bin``
    files where a local directory has only those, which transformers reads with
    ``torch.load(weights_only=True)``, so no code runs); a config file (``.json``, naming its
    ``model_type``) or a ``PretrainedConfig``: random weights drawn from ``seed``.

    ``device``: where the model ends up; random weights are drawn there (so a seed's weights on
    CUDA differ from those on CPU). ``load_in_4bit``: NF4 base weights with bf16 compute (QLoRA).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if isinstance(source, str) and is_config_file(source):
        with open(source) as f:
            if "model_type" not in json.load(f):
                raise ValueError(f"{source} has no `model_type`; a config JSON must name its model type "
                                 "(for example \"llama\")")
        source = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if isinstance(source, PretrainedConfig):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            return AutoModelForCausalLM.from_config(source, dtype=dtype, attn_implementation=attn_implementation,
                                                    trust_remote_code=trust_remote_code)
    extra: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    only_bin = (os.path.isdir(source) and not any(f.endswith(".safetensors") for f in os.listdir(source))
                and any(f.endswith(".bin") for f in os.listdir(source)))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=not only_bin,
                                                 attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code, **extra)
    return model if device is None or load_in_4bit else model.to(device)
