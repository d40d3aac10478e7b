"""A merged group (rows sharing a prompt) trains exactly the rows' pairs: the same per-pair losses
and gradients as the rows as separate groups, and as separate sequences (fp32, tiny model)."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_model
from test_step import BETA, assert_same, oracle_step

from prefixpo.layout import Group, build_batch, layout_group
from prefixpo.losses import get_loss
from prefixpo.modeling import apply_prefix_attention, build_attention_masks, compute_logps
from prefixpo.pairs import batch_pair_indices
from prefixpo.reference import reference_from_model
from prefixpo.step import pair_losses, preference_step


def rows_and_merged():
    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, 512, (n,), generator=gen).tolist()

    p, q = ids(30), ids(12)
    a, b, c, d, e = ids(9), ids(14), ids(5), ids(11), ids(7)
    rows = [Group(p, [a, b]), Group(p, [c, b]), Group(p, [a, c]), Group(p, [a, b]), Group(q, [d, e]),
            Group(q, [e, d], scores=[2.0, 1.0])]
    merged = [Group(p, [a, b, c], pairs=[(0, 1), (2, 1), (0, 2), (0, 1)]), Group(q, [d, e], pairs=[(0, 1), (1, 0)])]
    return rows, merged


def per_pair(policy, reference, groups):
    batch = build_batch([[layout_group(g)] for g in groups])
    masks = build_attention_masks(policy, batch)
    pairs = batch_pair_indices(batch)
    logps = compute_logps(policy, batch, masks, 32)
    with torch.no_grad():
        ref = compute_logps(reference, batch, masks, 32)
    losses, _ = pair_losses(logps, ref, pairs, get_loss("sigmoid", beta=BETA))
    return losses.detach()


def test_merged_group_same_pairs_losses_and_gradients():
    policy = tiny_model("llama", seed=0)
    reference = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    apply_prefix_attention(policy, "sdpa")
    apply_prefix_attention(reference, "sdpa")
    rows, merged = rows_and_merged()
    separate = per_pair(policy, reference, rows)
    shared = per_pair(policy, reference, merged)
    assert len(separate) == len(shared) == 6
    assert torch.allclose(separate, shared, rtol=1e-5, atol=1e-6), (separate - shared).abs().max()

    def step(groups):
        policy.zero_grad(set_to_none=True)
        batch = build_batch([[layout_group(g) for g in groups]])  # packed into one row
        result = preference_step(policy, [batch], get_loss("sigmoid", beta=BETA),
                                 reference=reference_from_model(reference), chunk_size=32)
        return result.loss, {n: p.grad.clone() for n, p in policy.named_parameters()}

    loss_rows, grads_rows = step(rows)
    loss_merged, grads_merged = step(merged)
    assert_same(loss_merged, grads_merged, loss_rows, grads_rows)
    # and against separate sequences (conftest's oracle): the rows' own pairs, one by one
    # each row as separate prompt+response sequences, its pair (0, 1)
    want_loss, want_grads = oracle_step(policy, reference, rows, pairs_of=lambda g: [(0, 1)])
    assert_same(loss_merged, grads_merged, want_loss, want_grads)
    print(f"max |loss diff| per pair {(separate - shared).abs().max():.2e}; step loss {loss_rows:.6f} vs {loss_merged:.6f}; "
          f"max rel grad diff {max(float((grads_merged[n] - g).abs().max() / g.abs().max()) for n, g in grads_rows.items()):.2e}")
