"""Every loss against an independent oracle written here from its published formula (float64),
plus gradcheck, numerical edge cases and the registry's errors."""

import inspect
import math

import pytest
import torch

from prefixpo.losses import LOSSES, RunningMean, get_loss, loss_requires_reference


@pytest.fixture(autouse=True)
def float64_default():
    """Tests in this file run in float64; the global default is restored for other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

REFERENCE_FREE = {"simpo", "cpo", "orpo", "sft"}


# --- oracles: naive textbook forms on purpose (log(sigmoid), log(1 - p)), valid for moderate inputs ---


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def logsig(x):
    return torch.log(sig(x))


def h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def oracle_sigmoid(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    x = beta * ((pc - pr) - (rc - rr))  # the DPO reference code's logits
    return -(1 - label_smoothing) * logsig(x) - label_smoothing * logsig(-x)


def oracle_robust(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    x, e = beta * h(pc, pr, rc, rr), label_smoothing
    return ((1 - e) * -logsig(x) + e * logsig(-x)) / (1 - 2 * e)


def oracle_ipo(pc, pr, rc, rr, lc, lr, beta, length_normalize=True):
    x = (pc / lc - pr / lr) - (rc / lc - rr / lr) if length_normalize else h(pc, pr, rc, rr)
    return (x - 1 / (2 * beta)) ** 2


def oracle_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta):
    return -logsig(beta * ((pc - rc) / lc - (pr - rr) / lr))


def oracle_hinge(pc, pr, rc, rr, lc, lr, beta):
    return torch.clamp(1 - beta * h(pc, pr, rc, rr), min=0)


def oracle_exo_pair(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    # reverse KL between the model's preference distribution and the smoothed label distribution
    q = sig(beta * h(pc, pr, rc, rr))
    e = label_smoothing
    return q * torch.log(q / (1 - e)) + (1 - q) * torch.log((1 - q) / e)


def oracle_nca_pair(pc, pr, rc, rr, lc, lr, beta):
    a, b = beta * (pc - rc), beta * (pr - rr)
    return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)


def oracle_bco_pair(pc, pr, rc, rr, lc, lr, beta, delta):
    a, b = beta * (pc - rc), beta * (pr - rr)
    if delta == "batch_mean":
        delta = (a.sum() + b.sum()) / (2 * len(a))
    return -logsig(a - delta) - logsig(delta - b)


def oracle_sppo_hard(pc, pr, rc, rr, lc, lr, beta):
    return (pc - rc - 1 / (2 * beta)) ** 2 + (pr - rr + 1 / (2 * beta)) ** 2


def _quantile_dpo(a, b, beta, label_smoothing):
    x = beta * (sorted_list(a) - sorted_list(b))
    return -(1 - label_smoothing) * logsig(x) - label_smoothing * logsig(-x)


def sorted_list(t):
    return torch.stack(sorted(t.unbind(0), key=float))


def oracle_aot(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    return _quantile_dpo(pc - pr, rc - rr, beta, label_smoothing)


def oracle_aot_pair(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    return _quantile_dpo(pc - rc, pr - rr, beta, label_smoothing)


def oracle_apo_zero(pc, pr, rc, rr, lc, lr, beta):
    return 1 - sig(beta * (pc - rc)) + sig(beta * (pr - rr))


def oracle_apo_down(pc, pr, rc, rr, lc, lr, beta):
    return sig(beta * (pc - rc)) + 1 - sig(beta * h(pc, pr, rc, rr))


def oracle_discopop(pc, pr, rc, rr, lc, lr, beta, tau):
    x = beta * h(pc, pr, rc, rr)
    m = sig(x / tau)
    return (1 - m) * -logsig(x) + m * torch.exp(-x)


def oracle_dpop(pc, pr, rc, rr, lc, lr, beta, dpop_lambda):
    pen = torch.clamp(rc - pc, min=0)
    return -logsig(beta * (h(pc, pr, rc, rr) - dpop_lambda * pen))


def oracle_rpo(pc, pr, rc, rr, lc, lr, beta, alpha):
    return -logsig(beta * h(pc, pr, rc, rr)) - alpha * pc / lc


def oracle_simpo(pc, pr, rc, rr, lc, lr, beta, gamma, label_smoothing):
    x = beta * pc / lc - beta * pr / lr - gamma
    return -(1 - label_smoothing) * logsig(x) - label_smoothing * logsig(-x)


def oracle_cpo(pc, pr, rc, rr, lc, lr, beta, alpha, label_smoothing):
    x = beta * (pc - pr)
    return -(1 - label_smoothing) * logsig(x) - label_smoothing * logsig(-x) - alpha * pc / lc


def oracle_orpo(pc, pr, rc, rr, lc, lr, beta):
    p_c, p_r = torch.exp(pc / lc), torch.exp(pr / lr)
    odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    return -pc / lc - beta * torch.log(odds_ratio / (1 + odds_ratio))


def oracle_sft(pc, pr, rc, rr, lc, lr):
    return -pc / lc


# name -> (non-default params used in the tests, oracle, how rewards are defined)
CASES = {
    "sigmoid": ({"beta": 0.3, "label_smoothing": 0.1}, oracle_sigmoid, "dpo"),
    "robust": ({"beta": 0.3, "label_smoothing": 0.2}, oracle_robust, "dpo"),
    "ipo": ({"beta": 0.4}, oracle_ipo, "dpo"),
    "sigmoid_norm": ({"beta": 0.4}, oracle_sigmoid_norm, "dpo"),
    "hinge": ({"beta": 0.3}, oracle_hinge, "dpo"),
    "exo_pair": ({"beta": 0.3, "label_smoothing": 0.05}, oracle_exo_pair, "dpo"),
    "nca_pair": ({"beta": 0.3}, oracle_nca_pair, "dpo"),
    "bco_pair": ({"beta": 0.3, "delta": 0.25}, oracle_bco_pair, "dpo"),
    "sppo_hard": ({"beta": 0.3}, oracle_sppo_hard, "dpo"),
    "aot": ({"beta": 0.3, "label_smoothing": 0.1}, oracle_aot, "dpo"),
    "aot_pair": ({"beta": 0.3, "label_smoothing": 0.1}, oracle_aot_pair, "dpo"),
    "aot_unpaired": ({"beta": 0.3, "label_smoothing": 0.1}, oracle_aot_pair, "dpo"),
    "apo_zero": ({"beta": 0.3}, oracle_apo_zero, "dpo"),
    "apo_down": ({"beta": 0.3}, oracle_apo_down, "dpo"),
    "discopop": ({"beta": 0.3, "tau": 0.5}, oracle_discopop, "dpo"),
    "dpop": ({"beta": 0.3, "dpop_lambda": 5.0}, oracle_dpop, "dpo"),
    "rpo": ({"beta": 0.3, "alpha": 0.7}, oracle_rpo, "dpo"),
    "simpo": ({"beta": 2.5, "gamma": 0.8, "label_smoothing": 0.1}, oracle_simpo, "beta_avg"),
    "cpo": ({"beta": 0.3, "alpha": 0.7, "label_smoothing": 0.1}, oracle_cpo, "beta_sum"),
    "orpo": ({"beta": 0.3}, oracle_orpo, "beta_avg"),
    "sft": ({}, oracle_sft, "avg"),
}


def test_every_registered_loss_is_tested():
    # listwise is not pairwise: tests/test_pairs.py and tests/test_step.py test it
    assert set(CASES) == {n for n, spec in LOSSES.items() if not spec.listwise}


def make_inputs(n=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logps = [-(1 + 20 * torch.rand(n, generator=g)) for _ in range(4)]
    lengths = [torch.randint(1, 30, (n,), generator=g) for _ in range(2)]
    if requires_grad:
        logps = [x.requires_grad_() for x in logps]
    return (*logps, *lengths)


def call(name, params, pc, pr, rc, rr, lc, lr):
    if name in REFERENCE_FREE:
        rc = rr = None
    return get_loss(name, **params)(pc, pr, rc, rr, lc, lr)


def expected_rewards(kind, beta, pc, pr, rc, rr, lc, lr):
    lc, lr = lc.double(), lr.double()
    return {
        "dpo": (beta * (pc - rc), beta * (pr - rr)),
        "dpo_avg": (beta * (pc - rc) / lc, beta * (pr - rr) / lr),
        "beta_avg": (beta * pc / lc, beta * pr / lr),
        "beta_sum": (beta * pc, beta * pr),
        "avg": (pc / lc, pr / lr),
    }[kind]


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_matches_oracle(name):
    params, oracle, reward_kind = CASES[name]
    inputs = make_inputs()
    losses, metrics = call(name, params, *inputs)
    pc, pr, rc, rr, lc, lr = inputs
    expected = oracle(pc, pr, rc, rr, lc.double(), lr.double(), **params)
    assert losses.shape == (8,)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-10)
    # defaults too
    if True:
        accepted = inspect.signature(oracle).parameters
        defaults = {k: v for k, v in LOSSES[name].defaults.items() if k in accepted}
        torch.testing.assert_close(call(name, {}, *inputs)[0], oracle(pc, pr, rc, rr, lc.double(), lr.double(), **defaults))
    # metrics: per pair, detached, TRL names
    chosen, rejected = expected_rewards(reward_kind, params.get("beta", 1.0), *inputs)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected)
    torch.testing.assert_close(metrics["rewards/margins"], chosen - rejected)
    torch.testing.assert_close(metrics["rewards/accuracies"], (chosen > rejected).double())
    torch.testing.assert_close(metrics["logps/chosen"], pc)
    torch.testing.assert_close(metrics["logps/rejected"], pr)
    if name in {"rpo", "cpo", "orpo", "sft"}:
        torch.testing.assert_close(metrics["nll"], -pc / lc)
    for value in metrics.values():
        assert value.shape == (8,)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    params = CASES[name][0]
    pc, pr, rc, rr, lc, lr = make_inputs(n=6, seed=1, requires_grad=True)
    if name in REFERENCE_FREE:
        def fn(pc, pr):
            return get_loss(name, **params)(pc, pr, None, None, lc, lr)[0]
        assert torch.autograd.gradcheck(fn, (pc, pr))
    else:
        def fn(pc, pr, rc, rr):
            return get_loss(name, **params)(pc, pr, rc, rr, lc, lr)[0]
        assert torch.autograd.gradcheck(fn, (pc, pr, rc, rr))


@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_logps(name):
    params, oracle, _ = CASES[name]
    x = torch.full((4,), -3.0)
    n = torch.full((4,), 3)
    losses, _ = call(name, params, x, x, x, x, n, n)
    torch.testing.assert_close(losses, oracle(x, x, x, x, n.double(), n.double(), **params))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_huge_margins_are_finite(name, sign):
    params = CASES[name][0]
    # h = +-1e4 for reference-based losses, pi_c - pi_r = +-1e4 for reference-free ones
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = (torch.tensor([-1.0, -2.0]) - sign * 1e4).detach().requires_grad_()
    if sign < 0:
        pc, pr = (pc.detach() - 1e4).requires_grad_(), torch.tensor([-1.0, -2.0], requires_grad=True)
    rc, rr = torch.full((2,), -5.0, requires_grad=True), torch.full((2,), -5.0, requires_grad=True)
    n = torch.ones(2, dtype=torch.long)
    losses, metrics = call(name, params, pc, pr, rc, rr, n, n)
    assert torch.isfinite(losses).all(), losses
    losses.sum().backward()
    for t in (pc, pr) if name in REFERENCE_FREE else (pc, pr, rc, rr):
        assert t.grad is None or torch.isfinite(t.grad).all(), (name, t.grad)  # sft ignores pr
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_sigmoid_is_dpo_reference_formula():
    pc, pr, rc, rr, lc, lr = make_inputs(seed=3)
    losses, _ = get_loss("sigmoid", beta=0.1)(pc, pr, rc, rr, lc, lr)
    pi_logratios, ref_logratios = pc - pr, rc - rr
    torch.testing.assert_close(losses, -torch.log(sig(0.1 * (pi_logratios - ref_logratios))))


def test_ipo_is_on_length_averaged_logps():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -30.0, -12.0, -20.0))
    lc, lr = torch.tensor([2]), torch.tensor([5])
    losses, metrics = get_loss("ipo", beta=0.5)(pc, pr, rc, rr, lc, lr)
    # per-token: (-5 - -6) - (-6 - -4) = 3; (3 - 1/(2*0.5))^2 = 4
    torch.testing.assert_close(losses, torch.tensor([4.0]))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([1.0]))  # summed, as TRL logs
    # the DPO reference code's IPO, on sums: (2 - -10 - 1)^2 = 121
    summed, _ = get_loss("ipo", beta=0.5, length_normalize=False)(pc, pr, rc, rr, lc, lr)
    torch.testing.assert_close(summed, torch.tensor([121.0]))


def test_bco_pair_baselines():
    pc, pr, rc, rr, lc, lr = make_inputs(seed=4)
    default, _ = get_loss("bco_pair", beta=0.3)(pc, pr, rc, rr, lc, lr)
    torch.testing.assert_close(default, oracle_bco_pair(pc, pr, rc, rr, lc, lr, 0.3, 0.0))  # TRL 1.16
    batch, metrics = get_loss("bco_pair", beta=0.3, delta="batch_mean")(pc, pr, rc, rr, lc, lr)
    torch.testing.assert_close(batch, oracle_bco_pair(pc, pr, rc, rr, lc, lr, 0.3, "batch_mean"))
    mean_reward = float(torch.cat([0.3 * (pc - rc), 0.3 * (pr - rr)]).mean())
    torch.testing.assert_close(metrics["delta"], torch.full((8,), mean_reward))
    running = RunningMean()
    fn = get_loss("bco_pair", beta=0.3, delta=running)
    fn(pc, pr, rc, rr, lc, lr)
    pc2 = pc - 1.0
    second, _ = fn(pc2, pr, rc, rr, lc, lr)
    mean2 = float(torch.cat([0.3 * (pc2 - rc), 0.3 * (pr - rr)]).mean())
    assert running.count == 2
    torch.testing.assert_close(second, oracle_bco_pair(pc2, pr, rc, rr, lc, lr, 0.3, (mean_reward + mean2) / 2))


def test_aot_sorts_across_the_batch():
    pc, pr, rc, rr, lc, lr = make_inputs(seed=5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    fn = get_loss("aot_pair", beta=0.3)
    a, _ = fn(pc, pr, rc, rr, lc, lr)
    # permuting only the rejected side changes nothing: the quantiles are matched, not the pairs
    b, _ = fn(pc, pr[perm], rc, rr[perm], lc, lr)
    torch.testing.assert_close(a, b)


def test_zero_length_is_rejected():
    pc, pr, rc, rr, lc, lr = make_inputs()
    lc0, lr0 = lc.clone(), lr.clone()
    lc0[3], lr0[5] = 0, 0
    for name in ("sigmoid", "sft", "simpo"):
        with pytest.raises(ValueError, match="chosen_lengths"):
            get_loss(name)(pc, pr, rc, rr, lc0, lr)
        with pytest.raises(ValueError, match="rejected_lengths"):
            get_loss(name)(pc, pr, rc, rr, lc, lr0)


def test_reference_arguments():
    pc, pr, rc, rr, lc, lr = make_inputs()
    for name in CASES:
        assert loss_requires_reference(name) == (name not in REFERENCE_FREE)
        if name in REFERENCE_FREE:
            a, _ = get_loss(name)(pc, pr, None, None, lc, lr)
            b, _ = get_loss(name)(pc, pr, rc, rr, lc, lr)  # given references are ignored
            torch.testing.assert_close(a, b)
        else:
            with pytest.raises(ValueError, match="reference_chosen_logps"):
                get_loss(name)(pc, pr, None, None, lc, lr)
    assert loss_requires_reference(["sft", "sigmoid"]) and not loss_requires_reference(["sft", "simpo"])


def test_shape_mismatch_is_rejected():
    pc, pr, rc, rr, lc, lr = make_inputs()
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        get_loss("sigmoid")(pc, pr[:3], rc, rr, lc, lr)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("dpo",), {}, "sigmoid, sigmoid_norm, robust"),
        (("sigmoid",), {"betta": 0.1}, "betta.*beta=0.1"),
        (("sigmoid",), {"beta": 0.0}, "beta"),
        (("sigmoid",), {"beta": -1.0}, "beta"),
        (("sigmoid",), {"label_smoothing": 0.5}, r"\[0, 0.5\)"),
        (("robust",), {"label_smoothing": -0.1}, "label_smoothing"),
        (("exo_pair",), {"label_smoothing": 0.0}, r"\(0, 0.5\)"),
        (("discopop",), {"tau": 0.0}, "tau"),
        (("sft",), {"beta": 0.1}, "beta"),
        (("bco_pair",), {"delta": "mean"}, "delta"),
        (("sigmoid",), {"f_divergence_type": "kl"}, "f_divergence_type"),
        (("nca_pair",), {"f_divergence_type": "forward_kl"}, "f_divergence_type"),
        (("ipo",), {"length_normalize": 1}, "length_normalize"),
        (("listwise",), {"ld_alpha": 0.5}, "ld_alpha"),
        ((["listwise", "sft"],), {"loss_weights": [1.0, 1.0]}, "combined"),
        ((["sigmoid", "sft"],), {"loss_weights": [1.0]}, "loss_weights"),
        ((["sigmoid", "sft"],), {}, "loss_weights"),
        ((["sigmoid", "sigmoid"],), {"loss_weights": [1.0, 1.0]}, "distinct"),
        ((["sigmoid", "sft"],), {"loss_weights": [1.0, 1.0], "params": {"ipo": {}}}, "ipo"),
        ((["sigmoid", "sft"],), {"loss_weights": [1.0, 1.0], "gamma": 1.0}, "gamma"),
        ((["sigmoid", "sft"],), {"loss_weights": [1.0, 1.0], "params": {"sigmoid": {"beta": 0}}}, "beta"),
    ],
)
def test_bad_configuration_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_loss(*args, **kwargs)


def test_weighted_combination():
    pc, pr, rc, rr, lc, lr = make_inputs(seed=6)
    fn = get_loss(["sigmoid", "sft", "nca_pair"], loss_weights=[1.0, 0.5, 2.0], beta=0.2,
                  params={"sigmoid": {"beta": 0.4, "label_smoothing": 0.1}})
    losses, metrics = fn(pc, pr, rc, rr, lc, lr)
    lcd, lrd = lc.double(), lr.double()
    s = oracle_sigmoid(pc, pr, rc, rr, lcd, lrd, 0.4, 0.1)
    f = oracle_sft(pc, pr, rc, rr, lcd, lrd)
    c = oracle_nca_pair(pc, pr, rc, rr, lcd, lrd, 0.2)  # shared beta reaches the losses without params
    torch.testing.assert_close(losses, s + 0.5 * f + 2.0 * c)
    torch.testing.assert_close(metrics["rewards/chosen"], 0.4 * (pc - rc))  # first loss's rewards
    torch.testing.assert_close(metrics["nll"], -pc / lcd)
    torch.testing.assert_close(metrics["loss/sft"], f)
    assert loss_requires_reference(["sigmoid", "sft"])
    single = get_loss("sft", loss_weights=[0.25])(pc, pr, rc, rr, lc, lr)[0]
    torch.testing.assert_close(single, 0.25 * f)
    ref_free = get_loss(["simpo", "sft"], loss_weights=[1.0, 1.0])
    torch.testing.assert_close(
        ref_free(pc, pr, None, None, lc, lr)[0],
        oracle_simpo(pc, pr, None, None, lcd, lrd, 2.0, 0.5, 0.0) + oracle_sft(pc, pr, None, None, lcd, lrd),
    )


def test_metrics_are_detached_and_loss_has_grad():
    pc, pr, rc, rr, lc, lr = make_inputs(requires_grad=True)
    for name in CASES:
        losses, metrics = call(name, {}, pc, pr, rc, rr, lc, lr)
        assert losses.requires_grad
        assert not any(v.requires_grad for v in metrics.values())


def test_float32_inputs_keep_dtype():
    pc, pr, rc, rr, lc, lr = (x.float() if x.is_floating_point() else x for x in make_inputs())
    losses, metrics = get_loss("simpo")(pc, pr, rc, rr, lc, lr)
    assert losses.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32
    assert math.isfinite(float(losses.sum()))


def test_orpo_near_certain_responses():
    # log(1 - exp(a)) must stay accurate for a -> 0 in float32 (a naive form loses all digits)
    pc, pr = torch.tensor([-2e-5, -3.0]), torch.tensor([-2.0, -4e-5])
    n = torch.tensor([2, 1])
    losses, _ = get_loss("orpo", beta=0.5)(pc.float(), pr.float(), None, None, n, n)
    expected = oracle_orpo(pc, pr, None, None, n.double(), n.double(), 0.5)
    torch.testing.assert_close(losses, expected.float(), rtol=1e-5, atol=0)
    # a log-prob of exactly 0 is clamped, not inf
    zero = torch.zeros(2, requires_grad=True)
    out, _ = get_loss("orpo")(zero, torch.tensor([-1.0, 0.0]), None, None, n, n)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zero.grad).all()
