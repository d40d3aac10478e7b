"""The promise: the shared layout gives the log-probs and gradients of separate sequences."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_token_logps, tiny_model

import prefixpo.masks
from prefixpo.layout import Group, collate_groups
from prefixpo.modeling import (
    UnsupportedModelError,
    apply_prefix_attention,
    build_attention_masks,
    check_model,
    compile_layers,
    compute_logps,
    forward_hidden,
)


def case_groups(n: int, vocab: int = 512) -> list[Group]:
    """One batch covering the required cases: a one-token prompt, one-token responses, lengths
    that cross 128-token blocks, and groups of different lengths."""
    gen = torch.Generator().manual_seed(n)

    def ids(k):
        return torch.randint(0, vocab, (k,), generator=gen).tolist()

    return [
        Group(ids(1), [ids(5 + 3 * i) for i in range(n)]),              # one-token prompt
        Group(ids(9), [ids(1) for _ in range(n)]),                       # one-token responses
        Group(ids(130), [ids(140 - 7 * i) for i in range(n)]),           # crosses 128 in prompt and response
        Group(ids(40), [ids(20 + 11 * i) for i in range(n)]),
    ]


def dpo_style_loss(per_group: list[list[torch.Tensor]], lengths: list[list[int]]) -> torch.Tensor:
    loss = 0.0
    for sums, lens in zip(per_group, lengths):
        if len(sums) == 1:
            loss = loss - sums[0] / lens[0]
        for other in sums[1:]:
            loss = loss - F.logsigmoid(0.1 * (sums[0] - other))
    return loss


def oracle(model, groups):
    model.zero_grad(set_to_none=True)
    token_logps = [[oracle_token_logps(model, list(g.prompt_ids), list(r)) for r in g.response_ids] for g in groups]
    dpo_style_loss([[t.sum() for t in ts] for ts in token_logps],
                   [[len(r) for r in g.response_ids] for g in groups]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [[t.detach() for t in ts] for ts in token_logps], grads


def shared(model, groups, chunk_size=16):
    model.zero_grad(set_to_none=True)
    out = compute_logps(model, collate_groups(groups), chunk_size=chunk_size)
    per_response = list(out.token_logps.split(out.counts.tolist()))
    it = iter(per_response)
    token_logps = [[next(it) for _ in g.response_ids] for g in groups]
    dpo_style_loss([[t.sum() for t in ts] for ts in token_logps],
                   [[len(r) for r in g.response_ids] for g in groups]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [[t.detach() for t in ts] for ts in token_logps], grads


def assert_equivalent(want, got, want_grads, got_grads):
    for w_group, g_group in zip(want, got):
        for w, g in zip(w_group, g_group):
            diff = (w - g).abs()
            assert diff.mean() <= 1e-5, f"mean per-token diff {diff.mean():.2e}"
            assert diff.max() <= 1e-4, f"max per-token diff {diff.max():.2e}"
            assert abs(w.double().sum() - g.double().sum()) <= 1e-4
    assert want_grads.keys() == got_grads.keys()
    for name, w in want_grads.items():
        rel = (got_grads[name] - w).abs().max() / w.abs().max()
        assert rel <= 1e-4, f"gradient of {name} differs by {rel:.2e} (relative)"


@pytest.mark.parametrize("n", [1, 2, 4])
def test_shared_equals_separate_sequences(arch, n):
    model = tiny_model(arch)
    groups = case_groups(n)
    want, want_grads = oracle(model, groups)
    apply_prefix_attention(model, "sdpa")
    got, got_grads = shared(model, groups)
    assert_equivalent(want, got, want_grads, got_grads)


def test_a_plain_causal_mask_would_fail(arch, monkeypatch):
    """Vacuity guard: the same comparison with the sibling rule removed must fail."""
    def document_causal(document_ids, segment_ids, position_ids, sliding_window=None):
        def mask_mod(b, h, q, k):
            allowed = (k <= q) & (document_ids[b, q] == document_ids[b, k])
            if sliding_window is not None:
                allowed = allowed & (q - k < sliding_window)
            return allowed
        return mask_mod

    model = tiny_model(arch)
    groups = case_groups(2)
    want, _ = oracle(model, groups)
    monkeypatch.setattr(prefixpo.masks, "prefix_mask_mod", document_causal)
    apply_prefix_attention(model, "sdpa")
    got, _ = shared(model, groups)
    worst = max((w - g).abs().max().item() for wg, gg in zip(want, got) for w, g in zip(wg, gg))
    assert worst > 1e-2


def test_flex_forward_equals_dense_on_cpu(arch):
    model = tiny_model(arch)
    batch = collate_groups(case_groups(2))
    apply_prefix_attention(model, "sdpa")
    with torch.no_grad():
        dense = compute_logps(model, batch).token_logps
        apply_prefix_attention(model, "flex")
        flex = compute_logps(model, batch).token_logps
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_flex_refuses_backward_on_cpu():
    model = tiny_model("llama").train()
    apply_prefix_attention(model, "flex")
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        compute_logps(model, collate_groups(case_groups(1)[:1]))


def test_policy_and_reference_do_not_share_a_mutated_config():
    policy = tiny_model("llama")
    reference = copy.deepcopy(policy)
    reference.config = policy.config  # one config object, as when both load from the same config
    for module in reference.modules():
        if hasattr(module, "config"):
            module.config = policy.config
    apply_prefix_attention(policy, "sdpa")
    assert reference.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "prefixpo_dense" for m in policy.modules() if hasattr(m, "config"))


def test_mask_and_window_mismatch_is_refused():
    model = tiny_model("gemma2")  # alternating sliding and full layers
    apply_prefix_attention(model, "sdpa")
    batch = collate_groups(case_groups(2))
    masks = build_attention_masks(model, batch)
    assert set(masks) == {"sliding_attention", "full_attention"}
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        forward_hidden(model, batch, {layer_type: masks["full_attention"] for layer_type in masks})


@pytest.mark.parametrize("model_type", ["granite", "cohere"])
def test_unverified_architectures_are_checked_before_use(model_type):
    """Granite divides its logits, Cohere scales them: both must be handled, and checked at apply time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    groups = case_groups(2, vocab=128)
    want, want_grads = oracle(model, groups)
    with pytest.warns(UserWarning, match="not among prefixpo's verified architectures"):
        apply_prefix_attention(model, "sdpa")
    got, got_grads = shared(model, groups)
    assert_equivalent(want, got, want_grads, got_grads)


def test_unknown_logit_transform_is_refused():
    model = tiny_model("llama")
    original_forward = model.forward

    def forward_with_bias(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.logits = out.logits * 3.0 + 1.0
        return out

    model.forward = forward_with_bias
    with pytest.raises(UnsupportedModelError, match="transforms its logits"):
        apply_prefix_attention(model, "sdpa")


def test_models_without_position_ids_are_refused():
    class NoPositions(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_attn_implementation": "eager"})()
            self.model = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="position_ids"):
        check_model(NoPositions())


def test_unshared_layout_is_the_standard_recipe_too():
    """share_prefix=False (each response after its own prompt copy) must also equal separate sequences."""
    from prefixpo.layout import build_batch, layout_group

    model = tiny_model("qwen2")
    groups = case_groups(2)
    want, _ = oracle(model, groups)
    apply_prefix_attention(model, "sdpa")
    batch = build_batch([[layout_group(g, share_prefix=False)] for g in groups])
    with torch.no_grad():
        got = compute_logps(model, batch, chunk_size=16).token_logps
    torch.testing.assert_close(got, torch.cat([t for ts in want for t in ts]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_output_flags_in_the_config_install_no_capturing_hooks(arch):
    """A config that asks for hidden states and attentions (some checkpoints do) must not make
    transformers hook every layer: the hooks' ContextVar breaks each compiled layer into graphs."""
    model = tiny_model(arch)
    model.config.output_hidden_states = model.config.output_attentions = True
    apply_prefix_attention(model, "sdpa")
    batch = collate_groups(case_groups(2))
    compute_logps(model, batch)
    forward_hidden(model, batch)
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert not hooked, hooked


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_layers_round_bf16_as_the_uncompiled_model(arch):
    """In bf16 the compiled layers (``compile_layers``, as the trainer compiles them) give the
    uncompiled model's per-token log-probs bit for bit on (almost) every token, in the training
    graph and in the no-gradient graph alike. Without ``eager_numerics`` inductor keeps fused
    intermediates in fp32 and hardly any token matches: what the option changes. (On the CPU
    the training and no-gradient graphs agree either way; the disagreement the option removes,
    a policy and its reference apart at step 1, shows on the GPU: docs/benchmarks.md.)"""
    base = apply_prefix_attention(tiny_model(arch).to(torch.bfloat16), "sdpa", self_check=False)
    batch = collate_groups(case_groups(2))
    with torch.no_grad():
        uncompiled = compute_logps(base, batch).token_logps
    exact = {}
    for eager_numerics in (True, False):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compile_layers(model, eager_numerics=eager_numerics)
        training = compute_logps(model.train(), batch).token_logps.detach()
        with torch.no_grad():
            no_grad = compute_logps(model.eval(), batch).token_logps
        assert torch.equal(training, no_grad)
        exact[eager_numerics] = [(t == uncompiled).float().mean().item() for t in (training, no_grad)]
    torch._dynamo.reset()
    assert min(exact[True]) >= 0.98, exact
    assert max(exact[False]) <= 0.5, exact
