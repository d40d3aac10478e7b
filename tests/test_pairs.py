"""Pair construction from scores and the Plackett-Luce listwise DPO loss, against brute-force oracles."""

import itertools
import math

import pytest
import torch

from prefixpo.losses import get_loss
from prefixpo.pairs import PairConfig, batch_pairs, group_pairs, listwise_dpo_loss, rank_groups

# --- pair construction ---


def oracle_pairs(scores, strategy, min_gap):
    """Brute force from the definitions: best = first highest score, worst = first lowest."""
    n = len(scores)
    ok = [(i, j) for i in range(n) for j in range(n) if scores[i] - scores[j] > 0 and scores[i] - scores[j] >= min_gap]
    if strategy == "all":
        return sorted(ok)
    best = next(i for i in range(n) if scores[i] == max(scores))
    if strategy == "best_vs_each":
        return sorted(p for p in ok if p[0] == best)
    worst = next(i for i in range(n) if scores[i] == min(scores))
    return [(best, worst)] if (best, worst) in ok else []


@pytest.mark.parametrize(
    ("scores", "strategy", "min_gap", "expected"),
    [
        ([3, 1, 2], "all", 0.0, [(0, 1), (0, 2), (2, 1)]),
        ([3, 1, 2], "all", 1.5, [(0, 1)]),
        ([3, 1, 2], "all", 2.0, [(0, 1)]),  # gap >= threshold is kept
        ([3, 1, 2], "all", 2.5, []),
        ([3, 3, 1], "all", 0.0, [(0, 2), (1, 2)]),  # a tie is never a pair
        ([3, 1, 2], "best_vs_each", 0.0, [(0, 1), (0, 2)]),
        ([3, 1, 2], "best_vs_each", 1.5, [(0, 1)]),
        ([1, 3, 3, 0], "best_vs_each", 0.0, [(1, 0), (1, 3)]),  # tied best: the first one; 1 vs 2 a tie
        ([3, 1, 2], "best_vs_worst", 0.0, [(0, 1)]),
        ([1, 2, 0, 0], "best_vs_worst", 0.0, [(1, 2)]),  # tied worst: the first one
        ([2, 2], "best_vs_worst", 0.0, []),
        ([2, 1], "best_vs_worst", 1.5, []),
        ([5], "all", 0.0, []),
    ],
)
def test_group_pairs_examples(scores, strategy, min_gap, expected):
    assert sorted(group_pairs(scores, strategy, min_gap)) == expected
    assert sorted(group_pairs(scores, strategy, min_gap)) == oracle_pairs(scores, strategy, min_gap)


@pytest.mark.parametrize("strategy", ["all", "best_vs_each", "best_vs_worst"])
def test_group_pairs_random_against_oracle(strategy):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 7, (1,), generator=g))
        scores = torch.randint(0, 4, (n,), generator=g).tolist()  # small range: many ties
        min_gap = float(torch.randint(0, 3, (1,), generator=g))
        assert sorted(group_pairs(scores, strategy, min_gap)) == oracle_pairs(scores, strategy, min_gap)


def test_bad_strategy_and_gap():
    with pytest.raises(ValueError, match="best_vs_worst"):
        group_pairs([1, 2], "random")
    with pytest.raises(ValueError, match="min_gap"):
        PairConfig("all", -1.0)
    with pytest.raises(ValueError, match="NaN"):
        group_pairs([1.0, float("nan")])


def test_batch_pairs_flat_indices():
    scores = [[3.0, 1.0, 2.0], [5.0, 5.0], [0.0, 1.0]]
    response_group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = batch_pairs(scores, response_group, "all")
    assert out.chosen_idx.tolist() == [0, 0, 2, 6]
    assert out.rejected_idx.tolist() == [1, 2, 1, 5]
    assert out.pair_group.tolist() == [0, 0, 0, 2]
    assert out.skipped_groups == [1] and out.num_skipped == 1 and out.num_pairs == 4
    assert out.chosen_idx.dtype == torch.long
    # the caller indexes per-response tensors with them
    flat = torch.tensor([s for group in scores for s in group])
    assert bool((flat[out.chosen_idx] > flat[out.rejected_idx]).all())
    assert bool((response_group[out.chosen_idx] == response_group[out.rejected_idx]).all())
    # flat scores give the same pairs
    same = batch_pairs(flat, response_group, "all")
    assert same.chosen_idx.tolist() == out.chosen_idx.tolist()
    assert same.rejected_idx.tolist() == out.rejected_idx.tolist()


def test_batch_pairs_random_against_oracle():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 6, (30,), generator=g).tolist()
    scores = [torch.randint(0, 5, (n,), generator=g).tolist() for n in sizes]
    response_group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for strategy in ("all", "best_vs_each", "best_vs_worst"):
        out = batch_pairs(scores, response_group, strategy, 1.0)
        expected, skipped, offset = [], [], 0
        for gi, s in enumerate(scores):
            pairs = oracle_pairs(s, strategy, 1.0)
            expected += [(offset + i, offset + j) for i, j in pairs]
            if not pairs:
                skipped.append(gi)
            offset += len(s)
        got = list(zip(out.chosen_idx.tolist(), out.rejected_idx.tolist(), strict=True))
        assert sorted(got) == sorted(expected)
        assert out.skipped_groups == skipped


def test_batch_pairs_reports_or_raises_on_groups_without_pairs(caplog):
    response_group = torch.tensor([0, 0, 1, 1])
    with caplog.at_level("INFO", logger="prefixpo.pairs"):
        out = batch_pairs([[1, 1], [2, 1]], response_group, "best_vs_worst")
    assert out.skipped_groups == [0]
    assert "1 of 2 groups" in caplog.text
    with pytest.raises(ValueError, match="group 0"):
        batch_pairs([[1, 1], [2, 1]], response_group, "best_vs_worst", on_no_pair="error")


def test_batch_pairs_checks_numbering():
    with pytest.raises(ValueError, match="responses per group"):
        batch_pairs([[1, 2, 3], [1, 2]], torch.tensor([0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match="in order"):
        batch_pairs([[1, 2], [1, 2]], torch.tensor([0, 1, 0, 1]))


# --- listwise (Plackett-Luce) DPO ---


def oracle_plackett_luce(policy, reference, ranking, beta):
    """-log P(ranking) under Plackett-Luce with scores beta * (pi - ref), term by term in Python."""
    r = [beta * (float(policy[i]) - float(reference[i])) for i in ranking]
    total = 0.0
    for k in range(len(r)):
        total -= r[k] - math.log(sum(math.exp(x) for x in r[k:]))
    return total


def random_logps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (-(1 + 20 * torch.rand(n, generator=g, dtype=torch.float64)),
            -(1 + 20 * torch.rand(n, generator=g, dtype=torch.float64)))


def test_listwise_matches_oracle_with_variable_group_sizes():
    policy, reference = random_logps(12, 0)
    rankings = [[2, 0, 1], [3, 4], [9, 5, 8, 7, 6], [11, 10]]
    losses, metrics = listwise_dpo_loss(policy, reference, [torch.tensor(r) for r in rankings], beta=0.3)
    expected = [oracle_plackett_luce(policy, reference, r, 0.3) for r in rankings]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    rewards = 0.3 * (policy - reference)
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[[2, 3, 9, 11]])
    torch.testing.assert_close(metrics["rewards/rejected"], rewards[[1, 4, 6, 10]])
    torch.testing.assert_close(metrics["logps/chosen"], policy[[2, 3, 9, 11]])
    for gi, r in enumerate(rankings):
        pairs = list(itertools.combinations(r, 2))
        acc = sum(float(rewards[a] > rewards[b]) for a, b in pairs) / len(pairs)
        assert metrics["rewards/accuracies"][gi].item() == pytest.approx(acc)


def test_listwise_is_a_distribution_over_rankings():
    policy, reference = random_logps(4, 1)
    total = 0.0
    for perm in itertools.permutations(range(4)):
        loss, _ = listwise_dpo_loss(policy, reference, [list(perm)], beta=0.5)
        total += math.exp(-float(loss))
    assert total == pytest.approx(1.0, rel=1e-12)


def test_listwise_with_two_responses_equals_sigmoid():
    policy, reference = random_logps(10, 2)
    rankings = [[0, 1], [3, 2], [4, 5], [7, 6], [8, 9]]
    listwise, lw_metrics = listwise_dpo_loss(policy, reference, rankings, beta=0.2)
    c, r = torch.tensor([x[0] for x in rankings]), torch.tensor([x[1] for x in rankings])
    lengths = torch.ones(5, dtype=torch.long)
    pairwise, pw_metrics = get_loss("sigmoid", beta=0.2)(policy[c], policy[r], reference[c], reference[r], lengths, lengths)
    torch.testing.assert_close(listwise, pairwise)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        torch.testing.assert_close(lw_metrics[key], pw_metrics[key])


def test_listwise_gradcheck_and_extremes():
    policy, reference = random_logps(7, 3)
    policy.requires_grad_()
    reference.requires_grad_()
    rankings = [[0, 1, 2, 3], [5, 4], [6, 4, 0]]  # groups may even share responses; indices are free
    assert torch.autograd.gradcheck(lambda p, q: listwise_dpo_loss(p, q, rankings, beta=0.4)[0], (policy, reference))
    extreme = torch.tensor([0.0, -1e4, 1e4, -1e4], dtype=torch.float64, requires_grad=True)
    losses, _ = listwise_dpo_loss(extreme, torch.zeros(4, dtype=torch.float64), [[0, 1, 2], [3, 2]], beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(extreme.grad).all()


def test_listwise_rejects_bad_rankings():
    policy, reference = random_logps(4, 4)
    with pytest.raises(ValueError, match=r"rankings\[1\]"):
        listwise_dpo_loss(policy, reference, [[0, 1], [2]])
    with pytest.raises(ValueError, match="distinct"):
        listwise_dpo_loss(policy, reference, [[0, 0]])
    with pytest.raises(ValueError, match="outside"):
        listwise_dpo_loss(policy, reference, [[0, 4]])
    with pytest.raises(ValueError, match="beta"):
        listwise_dpo_loss(policy, reference, [[0, 1]], beta=0.0)


def test_rank_groups_orders_best_first_and_skips_singletons():
    response_group = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    rankings, skipped = rank_groups([[1.0, 3.0, 2.0], [4.0], [2.0, 5.0, 2.0]], response_group)
    assert [r.tolist() for r in rankings] == [[1, 2, 0], [5, 4, 6]]  # tie 4 vs 6 keeps response order
    assert skipped == [1]
    flat_rankings, _ = rank_groups(torch.tensor([1.0, 3.0, 2.0, 4.0, 2.0, 5.0, 2.0]), response_group)
    assert [r.tolist() for r in flat_rankings] == [[1, 2, 0], [5, 4, 6]]
