"""Packing, micro-batching, accumulation and ranks must not change the step's loss or gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_token_logps, tiny_model

from prefixpo.layout import Group, build_batch, layout_group
from prefixpo.losses import get_loss
from prefixpo.modeling import apply_prefix_attention
from prefixpo.packing import pack
from prefixpo.pairs import batch_pair_indices
from prefixpo.reference import reference_from_model
from prefixpo.step import preference_step, sft_step

BETA = 0.1


def make_groups(seed=0, vocab=512):
    gen = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(0, vocab, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()

    groups = [Group(ids(1, 60), [ids(1, 50), ids(1, 50)]) for _ in range(7)]
    groups.append(Group(ids(5, 40), [ids(1, 30), ids(1, 30), ids(1, 30)], scores=[2.0, 0.5, 1.0]))
    return groups


def oracle_pairs(group):
    if group.scores is None:
        return [(0, 1)]
    return [(0, 1), (0, 2), (2, 1)]  # scores [2.0, 0.5, 1.0], every pair with a positive gap


def oracle_step(policy, reference, groups, pairs_of=oracle_pairs):
    """Separate sequences, the DPO reference formula, the mean over all pairs of the step
    (``pairs_of(group)``: its (chosen, rejected) pairs)."""
    policy.zero_grad(set_to_none=True)
    losses = []
    for g in groups:
        pol = [oracle_token_logps(policy, list(g.prompt_ids), list(r)).sum() for r in g.response_ids]
        with torch.no_grad():
            ref = [oracle_token_logps(reference, list(g.prompt_ids), list(r)).sum() for r in g.response_ids]
        for c, r in pairs_of(g):
            losses.append(-F.logsigmoid(BETA * ((pol[c] - pol[r]) - (ref[c] - ref[r]))))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}


def shared_step(policy, reference, micro_batches):
    policy.zero_grad(set_to_none=True)
    result = preference_step(policy, micro_batches, get_loss("sigmoid", beta=BETA),
                             reference=reference_from_model(reference), chunk_size=32)
    return result, {n: p.grad.clone() for n, p in policy.named_parameters()}


def assert_same(loss, grads, want_loss, want_grads):
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name, w in want_grads.items():
        rel = (grads[name] - w).abs().max() / w.abs().max()
        assert rel <= 1e-5, f"{name}: {rel:.2e}"


def unpacked(groups, per_micro_batch):
    layouts = [layout_group(g) for g in groups]
    return [build_batch([[lay] for lay in layouts[i:i + per_micro_batch]])
            for i in range(0, len(layouts), per_micro_batch)]


def packed(groups, capacity, rows_per_micro_batch, seed=0):
    layouts = [layout_group(g) for g in groups]
    rows = pack([len(lay) for lay in layouts], capacity, seed=seed, window=4)
    row_layouts = [[layouts[i] for i in row] for row in rows]
    assert max(len(r) for r in row_layouts) > 1  # really packed
    return [build_batch(row_layouts[i:i + rows_per_micro_batch], row_length=capacity)
            for i in range(0, len(row_layouts), rows_per_micro_batch)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    policy = tiny_model(request.param, seed=0)
    reference = tiny_model(request.param, seed=1)
    groups = make_groups()
    want = oracle_step(policy, reference, groups)
    apply_prefix_attention(policy, "sdpa")
    apply_prefix_attention(reference, "sdpa")
    return policy, reference, groups, want


@pytest.mark.parametrize("layout", [
    ("unpacked", 1), ("unpacked", 3), ("unpacked", 8),
    ("packed", 256, 1), ("packed", 256, 2), ("packed", 384, 1), ("packed", 1024, 1),
])
def test_step_equals_separate_sequences(models, layout):
    policy, reference, groups, (want_loss, want_grads) = models
    micro_batches = unpacked(groups, layout[1]) if layout[0] == "unpacked" else packed(groups, *layout[1:])
    result, grads = shared_step(policy, reference, micro_batches)
    assert result.count == 10  # 7 pairs + 3 from the scored group
    assert_same(result.loss, grads, want_loss, want_grads)


def test_sft_step_is_the_token_mean_over_the_step():
    model = tiny_model("llama")
    groups = [Group(g.prompt_ids, g.response_ids[:1]) for g in make_groups()]
    model.zero_grad(set_to_none=True)
    token_logps = torch.cat([oracle_token_logps(model, list(g.prompt_ids), list(g.response_ids[0])) for g in groups])
    (-token_logps.mean()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    apply_prefix_attention(model, "sdpa")
    for micro_batches in (unpacked(groups, 1), unpacked(groups, 5), packed(groups, 256, 1)):
        model.zero_grad(set_to_none=True)
        result = sft_step(model, micro_batches, chunk_size=16)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert_same(result.loss, grads, -token_logps.mean().item(), want)


def test_unscored_groups_must_be_pairs():
    batch = build_batch([[layout_group(Group([1], [[2], [3], [4]]))]])
    with pytest.raises(ValueError, match="group 0 of the batch has 3 responses and no scores"):
        batch_pair_indices(batch)


def test_an_empty_row_keeps_ranks_in_step(models):
    policy, reference, groups, (want_loss, want_grads) = models
    micro_batches = unpacked(groups, 8) + [build_batch([[]], row_length=128)]
    result, grads = shared_step(policy, reference, micro_batches)
    assert_same(result.loss, grads, want_loss, want_grads)


def test_copies_do_not_share_state():
    policy = tiny_model("llama")
    clone = copy.deepcopy(policy)
    apply_prefix_attention(policy, "sdpa")
    assert clone.config._attn_implementation == "eager"


def _separate_losses(policy, reference, groups, option):
    """Oracle for ld_alpha (LD-DPO sums from per-token log-probs of separate sequences) and listwise
    (Plackett-Luce over each group's ranking), the mean over pairs / groups."""
    policy.zero_grad(set_to_none=True)
    losses = []
    for g in groups:
        pol = [oracle_token_logps(policy, list(g.prompt_ids), list(r)) for r in g.response_ids]
        with torch.no_grad():
            ref = [oracle_token_logps(reference, list(g.prompt_ids), list(r)) for r in g.response_ids]
        if option == "listwise":
            order = [0, 1] if g.scores is None else sorted(range(len(g.scores)), key=lambda i: -g.scores[i])
            r = torch.stack([BETA * (pol[i].sum() - ref[i].sum()) for i in order])
            losses.append(-sum(r[k] - torch.logsumexp(r[k:], 0) for k in range(len(r))))
            continue
        for c, rj in oracle_pairs(g):
            n = min(len(pol[c]), len(pol[rj]))

            def ld(t, n=n):
                return t[:n].sum() + 0.3 * t[n:].sum()

            h = (ld(pol[c]) - ld(ref[c])) - (ld(pol[rj]) - ld(ref[rj]))
            losses.append(-F.logsigmoid(BETA * h))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("option", ["ld_alpha", "listwise", "use_weighting"])
def test_loss_options_through_the_step_with_prefix_sharing_and_packing(models, option):
    """ld_alpha and listwise equal separate sequences; every option gives the same step packed or not."""
    from prefixpo.pairs import PairConfig

    policy, reference, groups, _ = models
    if option == "listwise":
        loss_fn, pair_config = get_loss("listwise", beta=BETA), PairConfig("ranking")
    else:
        loss_fn, pair_config = get_loss("sigmoid", beta=BETA, **{option: 0.3 if option == "ld_alpha" else True}), None
    results = []
    for micro_batches in (unpacked(groups, 1), unpacked(groups, 8), packed(groups, 256, 2)):
        policy.zero_grad(set_to_none=True)
        result = preference_step(policy, micro_batches, loss_fn, reference=reference_from_model(reference),
                                 pair_config=pair_config, chunk_size=32)
        results.append((result.loss, {n: p.grad.clone() for n, p in policy.named_parameters()}))
        assert result.count == (8 if option == "listwise" else 10)
    for loss, grads in results[1:]:
        assert_same(loss, grads, *results[0])
    if option != "use_weighting":
        assert_same(*results[0], *_separate_losses(policy, reference, groups, option))


def test_masks_are_built_once_per_micro_batch_for_policy_and_a_collective_reference(models, monkeypatch):
    """A reference run ahead of the step (sharded: ``reference_for_step``) and the step itself share
    one mask build per micro-batch; the step's loss and gradients are the separate-sequence oracle's."""
    import prefixpo.step
    from prefixpo.modeling import build_attention_masks
    from prefixpo.reference import collective, reference_for_step

    policy, reference, groups, (want_loss, want_grads) = models
    micro_batches = packed(groups, 256, 1)
    builds = []

    def counted(model, batch):
        builds.append(id(batch))
        return build_attention_masks(model, batch)

    monkeypatch.setattr(prefixpo.step, "build_attention_masks", counted)
    ref_fn, masks = reference_for_step(collective(reference_from_model(reference, 32)), micro_batches,
                                       lambda mb: counted(policy, mb))
    policy.zero_grad(set_to_none=True)
    result = preference_step(policy, micro_batches, get_loss("sigmoid", beta=BETA), reference=ref_fn, chunk_size=32,
                             masks=masks)
    assert sorted(builds) == sorted(id(mb) for mb in micro_batches) and len(micro_batches) > 1
    assert_same(result.loss, {n: p.grad.clone() for n, p in policy.named_parameters()}, want_loss, want_grads)
