"""The offline pairwise preference losses, as small pure functions registered by name (docs/design.md section 4-5).

A loss sees only per-response log-probs summed over scored tokens, and the scored-token counts::

    pi_c, pi_r     policy log-probs of the chosen / rejected response      [num_pairs]
    ref_c, ref_r   reference log-probs (None for reference-free losses)    [num_pairs]
    len_c, len_r   scored tokens per response (> 0)                         [num_pairs]

and returns per-pair losses ``[num_pairs]`` and a dict of detached per-pair metrics ``[num_pairs]``
(TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, plus ``nll`` where the loss has an NLL term). Losses and
metrics stay per pair so the caller can average them over all pairs of an optimizer step.

    >>> loss_fn = get_loss("sigmoid", beta=0.1)
    >>> losses, metrics = loss_fn(pi_c, pi_r, ref_c, ref_r, len_c, len_r)   # doctest: +SKIP
    >>> loss = losses.sum() / pairs_in_optimizer_step                        # doctest: +SKIP

Formulas follow the papers and TRL's ``DPOTrainer`` / ``CPOTrainer`` / ``ORPOTrainer`` definitions;
``h = (pi_c - ref_c) - (pi_r - ref_r)`` throughout. See docs/losses.md for the table.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prefixpo.pairs import listwise_dpo_loss

Metrics = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Metrics]]


class PairLogps(NamedTuple):
    """Validated inputs of one call, all ``[num_pairs]``; ``ref_*`` are None for reference-free losses."""

    pi_c: Tensor
    pi_r: Tensor
    ref_c: Tensor | None
    ref_r: Tensor | None
    len_c: Tensor
    len_r: Tensor
    nll_c: Tensor | None = None  # plain summed chosen log-probs for the NLL terms, where pi_c is LD-weighted


class RunningMean:
    """Mean of the values passed to ``update`` so far; ``bco_pair``'s baseline in TRL's style.

    TRL's BCO pair loss keeps a running mean over steps of the batch-mean reward. Passing an instance
    as ``get_loss("bco_pair", delta=RunningMean())`` reproduces that; the loss is then stateful (each
    call updates the mean before using it), which is the one exception to "losses are pure".
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (value - self.mean) / self.count
        return self.mean


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def _margin(p: PairLogps) -> Tensor:
    """``h = (pi_c - ref_c) - (pi_r - ref_r)`` ``[num_pairs]``."""
    return (p.pi_c - p.ref_c) - (p.pi_r - p.ref_r)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _f_score(log_ratio: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """``f'(u)`` at ``u = pi / ref`` given ``log u`` (f-DPO, Wang et al. 2023, arXiv:2309.16240, Table 1).

    reverse_kl: ``log u`` (DPO); forward_kl: ``1 - 1/u``; js_divergence: ``log 2 + logsigmoid(log u)``
    (``log(2u / (1 + u))``); alpha_divergence: ``(u^(alpha-1) - 1) / (alpha - 1)``, whose exponent is
    clamped at 80 so ``exp`` stays finite in fp32 (alpha = 1 is reverse_kl, the limit).
    """
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        return torch.expm1(torch.clamp((alpha - 1.0) * log_ratio, max=80.0)) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}")


def _scores(p: PairLogps, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """``f'(pi/ref)`` of the chosen and of the rejected response ``[num_pairs]`` each."""
    return (_f_score(p.pi_c - p.ref_c, f_divergence_type, alpha),
            _f_score(p.pi_r - p.ref_r, f_divergence_type, alpha))


def _f_margin(p: PairLogps, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """``f'(pi_c/ref_c) - f'(pi_r/ref_r)``; with reverse_kl (the default) this is ``h``."""
    if f_divergence_type == "reverse_kl":
        return _margin(p)
    chosen, rejected = _scores(p, f_divergence_type, alpha)
    return chosen - rejected


def _nll(p: PairLogps) -> Tensor:
    """Length-normalised NLL of the chosen response, ``-pi_c / len_c`` ``[num_pairs]`` (with
    ``ld_alpha``, of its plain summed log-probs, as TRL's ``sft`` term)."""
    return -(p.pi_c if p.nll_c is None else p.nll_c) / p.len_c


def _metrics(p: PairLogps, chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": p.pi_c.detach(),
        "logps/rejected": p.pi_r.detach(),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return metrics


def _dpo_metrics(p: PairLogps, beta: float, **extra: Tensor) -> Metrics:
    """Rewards ``beta * (pi - ref)`` on summed log-probs, as TRL's DPOTrainer."""
    return _metrics(p, beta * (p.pi_c - p.ref_c), beta * (p.pi_r - p.ref_r), **extra)


def _smoothed_logistic(x: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) logsigmoid(x) - eps logsigmoid(-x)``: cross-entropy with labels smoothed by eps."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------------
# Reference-based losses


def sigmoid(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), conservative DPO when ``label_smoothing > 0``.

    ``loss = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``, ``h = (pi_c - ref_c) - (pi_r - ref_r)``.
    With ``eps = 0`` this is the DPO reference code's ``-logsigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r)))``.
    Conservative DPO: Mitchell, "A note on DPO with noisy preferences" (2023), as the DPO reference code;
    TRL 1.16's ``sigmoid`` ignores label_smoothing. TRL defaults beta=0.1, eps=0.
    ``f_divergence_type``: ``h = f'(pi_c/ref_c) - f'(pi_r/ref_r)`` (f-DPO, see ``_f_score``).
    """
    x = beta * _f_margin(p, f_divergence_type, f_alpha_divergence_coef)
    return _smoothed_logistic(x, label_smoothing), _dpo_metrics(p, beta)


def sigmoid_norm(p: PairLogps, beta: float = 0.1,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """Length-normalised DPO, as TRL's ``sigmoid_norm`` (the ``1/|y|`` DPO of Meng et al. 2024, SimPO,
    arXiv:2405.14734, and Liu et al. 2024, LD-DPO's baseline): ``loss = -logsigmoid(beta (s_c/len_c - s_r/len_r))``
    with ``s = pi - ref`` (or ``f'(pi/ref)`` under ``f_divergence_type``). Rewards: summed ``beta (pi - ref)``, as TRL.
    """
    s_c, s_r = _scores(p, f_divergence_type, f_alpha_divergence_coef)
    return -F.logsigmoid(beta * (s_c / p.len_c - s_r / p.len_r)), _dpo_metrics(p, beta)


def robust(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """Robust DPO, rDPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label-flip rate eps.

    ``loss = ((1 - eps) (-logsigmoid(beta h)) + eps logsigmoid(-beta h)) / (1 - 2 eps)``, eps in [0, 0.5).
    """
    x = beta * _f_margin(p, f_divergence_type, f_alpha_divergence_coef)
    losses = (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x)) / (
        1 - 2 * label_smoothing
    )
    return losses, _dpo_metrics(p, beta)


def ipo(p: PairLogps, beta: float = 0.1, length_normalize: bool = True,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17; beta is the paper's tau).

    ``loss = (h - 1/(2 beta))^2``. ``length_normalize=True`` (default, as TRL): on length-averaged
    log-ratios, ``h = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r`` (the IPO authors' per-token form);
    ``False``: on summed log-ratios, as the DPO reference code's ``ipo``. Rewards are always the
    summed ``beta (pi - ref)`` (what TRL logs for every loss).
    """
    s_c, s_r = _scores(p, f_divergence_type, f_alpha_divergence_coef)
    h = s_c / p.len_c - s_r / p.len_r if length_normalize else s_c - s_r
    return (h - 1 / (2 * beta)) ** 2, _dpo_metrics(p, beta)


def hinge(p: PairLogps, beta: float = 0.1,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425), as in TRL: ``loss = relu(1 - beta h)``.

    ``1/beta`` is the margin on ``h``.
    """
    return torch.relu(1 - beta * _f_margin(p, f_divergence_type, f_alpha_divergence_coef)), _dpo_metrics(p, beta)


def exo_pair(p: PairLogps, beta: float = 0.1, label_smoothing: float = 1e-3,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """EXO, pairwise form (Ji et al. 2024, arXiv:2402.00856, eq. 16): reverse KL to smoothed labels.

    ``loss = s(x) (logsigmoid(x) - log(1 - eps)) + s(-x) (logsigmoid(-x) - log(eps))``, ``x = beta h``,
    ``s`` the sigmoid. eps must be in (0, 0.5); TRL replaces eps=0 by 1e-3, here the default is 1e-3.
    """
    x = beta * _f_margin(p, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )
    return losses, _dpo_metrics(p, beta)


def nca_pair(p: PairLogps, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """NCA, pairwise form (Chen et al. 2024, Noise Contrastive Alignment, arXiv:2402.05369).

    With rewards ``r = beta (pi - ref)``:
    ``loss = -logsigmoid(r_c) - 0.5 logsigmoid(-r_c) - 0.5 logsigmoid(-r_r)``.
    """
    r_c, r_r = beta * (p.pi_c - p.ref_c), beta * (p.pi_r - p.ref_r)
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return losses, _dpo_metrics(p, beta)


def bco_pair(p: PairLogps, beta: float = 0.1, delta: float | str | RunningMean = 0.0) -> tuple[Tensor, Metrics]:
    """BCO, pairwise form (Jung et al. 2024, Binary Classifier Optimization, arXiv:2404.04656).

    With rewards ``r = beta (pi - ref)`` and a reward baseline ``delta``:
    ``loss = -logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))``.

    ``delta``: a number, a fixed baseline; 0.0 (default) is TRL 1.16's ``bco_pair`` (no baseline).
    ``"batch_mean"``: the detached mean of this batch's 2 * num_pairs rewards (the paper's reward
    shift, kept pure). A ``RunningMean``: a running mean over calls of the batch-mean reward, as
    TRL's BCOTrainer keeps (updated by each call, so the loss is stateful, and per rank).
    """
    r_c, r_r = beta * (p.pi_c - p.ref_c), beta * (p.pi_r - p.ref_r)
    if isinstance(delta, str):  # "batch_mean", checked by the registry
        baseline: Tensor | float = torch.cat([r_c, r_r]).mean().detach()
    elif isinstance(delta, RunningMean):
        baseline = delta.update(float(torch.cat([r_c, r_r]).mean()))
    else:
        baseline = float(delta)
    losses = -F.logsigmoid(r_c - baseline) - F.logsigmoid(-(r_r - baseline))
    return losses, _dpo_metrics(p, beta, delta=torch.as_tensor(baseline, dtype=r_c.dtype).expand_as(r_c))


def sppo_hard(p: PairLogps, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P in {0, 1}).

    ``loss = ((pi_c - ref_c) - 1/(2 beta))^2 + ((pi_r - ref_r) + 1/(2 beta))^2``.
    """
    a, b = p.pi_c - p.ref_c, p.pi_r - p.ref_r
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return losses, _dpo_metrics(p, beta)


def _sorted_margin(a: Tensor, b: Tensor) -> Tensor:
    return torch.sort(a, dim=0).values - torch.sort(b, dim=0).values


def aot(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """AOT for paired data (Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal
    Transport, arXiv:2406.05882), as TRL's ``aot``.

    Sort the policy ratios ``pi_c - pi_r`` and the reference ratios ``ref_c - ref_r`` across the batch,
    ``d = sort(pi_c - pi_r) - sort(ref_c - ref_r)``, ``loss = -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)``.
    The loss of "pair i" is that of the i-th quantile, not of pair i itself; only the batch mean means much.
    """
    d = _sorted_margin(p.pi_c - p.pi_r, p.ref_c - p.ref_r)
    return _smoothed_logistic(beta * d, label_smoothing), _dpo_metrics(p, beta)


def aot_pair(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """AOT for unpaired data (Melnyk et al. 2024, arXiv:2406.05882), as TRL's ``aot_pair``.

    Sort the chosen ratios ``pi_c - ref_c`` and the rejected ratios ``pi_r - ref_r`` separately,
    ``d = sort(pi_c - ref_c) - sort(pi_r - ref_r)``, ``loss = -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)``.
    """
    d = _sorted_margin(p.pi_c - p.ref_c, p.pi_r - p.ref_r)
    return _smoothed_logistic(beta * d, label_smoothing), _dpo_metrics(p, beta)


def apo_zero(p: PairLogps, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024, Anchored Preference Optimization, arXiv:2408.06266, eq. 7).

    For chosen responses better than the model's own: ``loss = (1 - s(beta (pi_c - ref_c))) + s(beta (pi_r - ref_r))``.
    """
    losses = (1 - torch.sigmoid(beta * (p.pi_c - p.ref_c))) + torch.sigmoid(beta * (p.pi_r - p.ref_r))
    return losses, _dpo_metrics(p, beta)


def apo_down(p: PairLogps, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8).

    For chosen responses worse than the model's own: ``loss = s(beta (pi_c - ref_c)) + (1 - s(beta h))``.
    """
    losses = torch.sigmoid(beta * (p.pi_c - p.ref_c)) + (1 - torch.sigmoid(beta * _margin(p)))
    return losses, _dpo_metrics(p, beta)


def discopop(p: PairLogps, beta: float = 0.1, tau: float = 0.05,
        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Metrics]:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, arXiv:2406.08414, eq. 5); TRL's discopop_tau=0.05.

    ``x = beta h``, ``m = s(x / tau)``, ``loss = (1 - m) (-logsigmoid(x)) + m exp(-x)``.
    ``m exp(-x)`` is computed as ``exp(logsigmoid(x / tau) - x)`` so large |x| gives no inf * 0.
    """
    x = beta * _f_margin(p, f_divergence_type, f_alpha_divergence_coef)
    losses = torch.sigmoid(-x / tau) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / tau) - x)
    return losses, _dpo_metrics(p, beta)


def dpop(p: PairLogps, beta: float = 0.1, dpop_lambda: float = 50.0) -> tuple[Tensor, Metrics]:
    """DPO-Positive (Pal et al. 2024, Smaug, arXiv:2402.13228, eq. 3; lambda=50 as in the paper).

    ``loss = -logsigmoid(beta (h - lambda max(0, ref_c - pi_c)))``: penalises lowering the chosen
    response's likelihood below the reference's. TRL has no DPOP loss type.
    """
    penalty = torch.relu(p.ref_c - p.pi_c)
    return -F.logsigmoid(beta * (_margin(p) - dpop_lambda * penalty)), _dpo_metrics(p, beta, penalty=penalty)


def rpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> tuple[Tensor, Metrics]:
    """RPO / iterative RPO (Pang et al. 2024, arXiv:2404.19733): DPO plus a chosen NLL term.

    ``loss = -logsigmoid(beta h) + alpha (-pi_c / len_c)``. alpha=1.0 as in the paper (TRL's
    ``rpo_alpha`` defaults to None = off). TRL averages the NLL over all chosen tokens of the batch;
    here it is averaged per response, so each pair weighs the same (docs/design.md section 4).
    """
    nll = _nll(p)
    return -F.logsigmoid(beta * _margin(p)) + alpha * nll, _dpo_metrics(p, beta, nll=nll)


# ---------------------------------------------------------------------------------------------------
# Reference-free losses


def simpo(p: PairLogps, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6), reference-free and length-normalised.

    ``x = beta (pi_c/len_c - pi_r/len_r) - gamma``, ``loss = -(1-eps) logsigmoid(x) - eps logsigmoid(-x)``.
    gamma is the reward margin (TRL's ``simpo_gamma``, default 0.5). beta defaults to 2.0, the
    paper's usual value and TRL's SimPO recommendation (TRL's CPOConfig.beta itself defaults to 0.1).
    Rewards: ``beta * pi / len``. No NLL term (TRL's CPOTrainer adds ``cpo_alpha * nll``; combine
    with ``sft`` for that).
    """
    r_c, r_r = beta * p.pi_c / p.len_c, beta * p.pi_r / p.len_r
    return _smoothed_logistic(r_c - r_r - gamma, label_smoothing), _metrics(p, r_c, r_r)


def cpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """CPO (Xu et al. 2024, Contrastive Preference Optimization, arXiv:2401.08417, eq. 6), reference-free.

    ``loss = -(1-eps) logsigmoid(beta (pi_c - pi_r)) - eps logsigmoid(-beta (pi_c - pi_r)) + alpha (-pi_c / len_c)``.
    Defaults as TRL's CPOConfig (beta=0.1, cpo_alpha=1.0). Rewards ``beta * pi`` (summed), as TRL.
    NLL per response (TRL: over all chosen tokens of the batch).
    """
    nll = _nll(p)
    losses = _smoothed_logistic(beta * (p.pi_c - p.pi_r), label_smoothing) + alpha * nll
    return losses, _metrics(p, beta * p.pi_c, beta * p.pi_r, nll=nll)


def orpo(p: PairLogps, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """ORPO (Hong et al. 2024, Odds Ratio Preference Optimization, arXiv:2403.07691, eq. 6-7), reference-free.

    On length-averaged log-probs ``a = pi / len``, ``log odds(y) = a - log(1 - exp(a))``:
    ``loss = -pi_c / len_c - beta logsigmoid(log odds(y_c) - log odds(y_r))``.
    beta is the paper's lambda (TRL's ORPOConfig.beta, default 0.1); the NLL weight is 1 as in the paper.
    Requires log-probs < 0 (probability < 1); averaged log-probs above -1e-7 are clamped there (their
    gradient through the odds term is then 0) so a near-certain response gives no inf.
    Rewards ``beta * pi / len``, as TRL.
    """
    a_c = torch.clamp(p.pi_c / p.len_c, max=-1e-7)
    a_r = torch.clamp(p.pi_r / p.len_r, max=-1e-7)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    nll = _nll(p)
    losses = nll - beta * F.logsigmoid(log_odds)
    metrics = _metrics(p, beta * p.pi_c / p.len_c, beta * p.pi_r / p.len_r, nll=nll, log_odds_chosen=log_odds)
    return losses, metrics


def listwise(policy_logps: Tensor, reference_logps: Tensor, rankings: Sequence[Tensor],
             beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """Plackett-Luce listwise DPO (Rafailov et al. 2023, arXiv:2305.18290, Appendix A.3) over ranked
    groups: ``loss = -sum_k log(exp(r_k) / sum_{j >= k} exp(r_j))``, ``r = beta (pi - ref)``, per group.

    Not a pairwise loss: it takes the summed log-probs ``[R]`` of a batch's responses and, per group,
    their flat indices best-first (``pair_strategy: ranking`` gives them); one loss per group. For
    two responses it equals ``sigmoid``. See ``prefixpo.pairs.listwise_dpo_loss``.
    """
    return listwise_dpo_loss(policy_logps, reference_logps, rankings, beta)


def sft(p: PairLogps) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning on the chosen response: ``loss = -pi_c / len_c`` (mean token NLL).

    Rewards here are the length-averaged log-probs ``pi / len`` (no beta), for monitoring only.
    """
    nll = _nll(p)
    return nll, _metrics(p, p.pi_c / p.len_c, p.pi_r / p.len_r, nll=nll)


# ---------------------------------------------------------------------------------------------------
# Registry


def _in_half_open(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v < hi


_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_REAL = (lambda v: math.isfinite(v), "a finite number")
_COMMON_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": _POSITIVE,
    "label_smoothing": (_in_half_open(0.0, 0.5), "in [0, 0.5)"),
    "alpha": _NON_NEGATIVE,
    "gamma": _REAL,
    "tau": _POSITIVE,
    "dpop_lambda": _NON_NEGATIVE,
    "f_alpha_divergence_coef": _REAL,
}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, whether it needs reference log-probs, and parameter checks."""

    fn: Callable[..., tuple[Tensor, Metrics]]
    requires_reference: bool
    checks: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    listwise: bool = False  # takes (policy_logps [R], reference_logps [R], rankings), one loss per group

    @property
    def defaults(self) -> dict[str, Any]:
        params = list(inspect.signature(self.fn).parameters.values())[3 if self.listwise else 1:]
        return {q.name: q.default for q in params}

    def check(self, name: str, value: Any) -> None:
        if name == "delta":  # bco_pair: a number, "batch_mean" or a RunningMean
            if value == "batch_mean" or isinstance(value, RunningMean) or _is_number(value):
                return
            raise ValueError(f"loss {self.fn.__name__!r}: delta must be a number, 'batch_mean' or a RunningMean, "
                             f"got {value!r}")
        if name == "f_divergence_type":
            if value in F_DIVERGENCES:
                return
            raise ValueError(f"loss {self.fn.__name__!r}: f_divergence_type={value!r} is not allowed; choose one of "
                             f"{', '.join(F_DIVERGENCES)}")
        if name == "length_normalize":
            if isinstance(value, bool):
                return
            raise ValueError(f"loss {self.fn.__name__!r}: length_normalize must be true or false, got {value!r}")
        predicate, text = self.checks.get(name) or _COMMON_CHECKS[name]
        if not _is_number(value) or not predicate(float(value)):
            raise ValueError(f"loss {self.fn.__name__!r}: parameter {name}={value!r} is not allowed; it must be {text}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, True),
    "sigmoid_norm": LossSpec(sigmoid_norm, True),
    "robust": LossSpec(robust, True),
    "ipo": LossSpec(ipo, True),
    "hinge": LossSpec(hinge, True),
    "exo_pair": LossSpec(exo_pair, True, {"label_smoothing": (lambda v: 0 < v < 0.5, "in (0, 0.5)")}),
    "nca_pair": LossSpec(nca_pair, True),
    "bco_pair": LossSpec(bco_pair, True),
    "sppo_hard": LossSpec(sppo_hard, True),
    "aot": LossSpec(aot, True),
    "aot_pair": LossSpec(aot_pair, True),
    "aot_unpaired": LossSpec(aot_pair, True),  # TRL 1.16's name for aot_pair
    "apo_zero": LossSpec(apo_zero, True),
    "apo_down": LossSpec(apo_down, True),
    "discopop": LossSpec(discopop, True),
    "dpop": LossSpec(dpop, True),
    "rpo": LossSpec(rpo, True),
    "simpo": LossSpec(simpo, False),
    "cpo": LossSpec(cpo, False),
    "orpo": LossSpec(orpo, False),
    "sft": LossSpec(sft, False),
    "listwise": LossSpec(listwise, True, listwise=True),
}


def _spec(name: str) -> LossSpec:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; the losses are: {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_requires_reference(name: str | Sequence[str], reference_free: bool = False) -> bool:
    """Whether the loss (or any loss of a combination) needs reference-model log-probs
    (never with ``reference_free``: the reference log-probs are then 0)."""
    names = [name] if isinstance(name, str) else list(name)
    return not reference_free and any(_spec(n).requires_reference for n in names)


def _bind(name: str, params: dict[str, Any]) -> Callable[[PairLogps], tuple[Tensor, Metrics]]:
    spec = _spec(name)
    allowed = spec.defaults
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter(s) {', '.join(unknown)}; its parameters are: "
            f"{', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    for key, value in params.items():
        spec.check(key, value)
    if spec.listwise:
        return lambda pi, ref, rankings: spec.fn(pi, ref, rankings, **params)
    return lambda p: spec.fn(p, **params)


def _listwise_fn(name: str, bound: Callable[..., tuple[Tensor, Metrics]], requires_reference: bool) -> LossFn:
    def loss_fn(policy_logps: Tensor, reference_logps: Tensor | None,
                rankings: Sequence[Tensor]) -> tuple[Tensor, Metrics]:
        if reference_logps is None:
            if requires_reference:
                raise ValueError(f"loss {name!r} needs reference_logps, got None")
            reference_logps = torch.zeros_like(policy_logps)  # reference_free
        return bound(policy_logps, reference_logps, rankings)

    loss_fn.__name__ = f"loss_{name}"
    loss_fn.listwise = True  # type: ignore[attr-defined]
    loss_fn.requires_reference = requires_reference  # type: ignore[attr-defined]
    loss_fn.ld_alpha = None  # type: ignore[attr-defined]
    loss_fn.use_weighting = False  # type: ignore[attr-defined]
    return loss_fn


def _validate(name: str, args: tuple[Any, ...], requires_reference: bool) -> PairLogps:
    arg_names = PairLogps._fields[:6]
    full = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
            "reference_rejected_logps", "chosen_lengths", "rejected_lengths")
    p = PairLogps(*args)
    shape = None
    for field_name, arg_name, value in zip(arg_names, full, p[:6], strict=True):
        if value is None:
            if field_name.startswith("ref_") and not requires_reference:
                continue
            raise ValueError(f"loss {name!r} needs {arg_name}, got None")
        if not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(f"{arg_name} must be a 1-D tensor [num_pairs], got {getattr(value, 'shape', value)!r}")
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            raise ValueError(f"{arg_name} has shape {tuple(value.shape)}, expected {tuple(shape)} like policy_chosen_logps")
        # lengths are checked where they live on the host; reading a device tensor would stall the step
        if field_name.startswith("len_") and value.device.type == "cpu" and bool((value <= 0).any()):
            bad = int((value <= 0).nonzero()[0])
            raise ValueError(f"{arg_name} must be > 0 (zero-length response at pair {bad}); drop empty responses upstream")
    if not requires_reference:
        p = p._replace(ref_c=None, ref_r=None)
    dtype = p.pi_c.dtype
    return p._replace(len_c=p.len_c.to(dtype), len_r=p.len_r.to(dtype))


def _check_names(name: str | Sequence[str]) -> list[str]:
    """The loss names as a list: at least one, each registered, none twice."""
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError(f"no loss given; the losses are: {', '.join(LOSSES)}")
    for n in names:
        _spec(n)
    if len(set(names)) != len(names):
        raise ValueError(f"loss names must be distinct, got {names}")
    return names


def _check_weights(names: list[str], loss_weights: Sequence[float] | None) -> list[float]:
    """One finite weight per loss; a single loss may leave them out (weight 1)."""
    if loss_weights is None:
        if len(names) > 1:
            raise ValueError(f"a combination of {len(names)} losses needs loss_weights, one per loss")
        loss_weights = [1.0]
    if len(loss_weights) != len(names):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(names)} losses {names}")
    if not all(_is_number(w) for w in loss_weights):
        raise ValueError(f"loss_weights must be finite numbers, got {list(loss_weights)}")
    return [float(w) for w in loss_weights]


def _bind_all(names: list[str], params: dict[str, dict[str, Any]], shared: dict[str, Any]) -> list[Callable[..., Any]]:
    """Each loss bound to its parameters: the ``shared`` keywords it has, overridden by ``params[name]``."""
    stray = sorted(set(params) - set(names))
    if stray:
        raise ValueError(f"params given for {stray}, which are not among the losses {names}")
    unused = [k for k in shared if not any(k in LOSSES[n].defaults for n in names)]
    if unused and len(names) > 1:
        allowed = sorted({k for n in names for k in LOSSES[n].defaults})
        raise ValueError(f"no loss among {names} has parameter(s) {unused}; allowed: {allowed}")
    bound = []
    for n in names:
        own = {k: v for k, v in shared.items() if k in LOSSES[n].defaults or len(names) == 1}
        bound.append(_bind(n, {**own, **params.get(n, {})}))
    return bound


def _check_options(names: list[str], reference_free: Any, ld_alpha: Any, use_weighting: Any) -> None:
    """The options of the whole loss (``get_loss``'s keyword-only arguments)."""
    if not isinstance(reference_free, bool):
        raise ValueError(f"reference_free must be true or false, got {reference_free!r}")
    if ld_alpha is not None and not (_is_number(ld_alpha) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must be a number in [0, 1] or None, got {ld_alpha!r}")
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be true or false, got {use_weighting!r}")
    sorting = [n for n in names if LOSSES[n].fn in (aot, aot_pair)]
    if use_weighting and sorting:
        raise ValueError(f"use_weighting (WPO) cannot weight {sorting}: they sort pairs across the batch, so a "
                         "pair's loss is not its own (TRL refuses this too)")


def _pairwise_fn(names: list[str], weights: list[float], bound: list[Callable[[PairLogps], tuple[Tensor, Metrics]]],
                 requires_reference: bool, zero_reference: bool, ld_alpha: float | None,
                 use_weighting: bool) -> LossFn:
    """The function ``get_loss`` returns for pairwise losses: inputs checked, the weighted sum of the
    bound losses, scaled by ``pair_weights`` under ``use_weighting``."""
    label = names[0] if len(names) == 1 else "+".join(names)

    def loss_fn(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        chosen_lengths: Tensor,
        rejected_lengths: Tensor,
        pair_weights: Tensor | None = None,
        nll_chosen_logps: Tensor | None = None,
    ) -> tuple[Tensor, Metrics]:
        if zero_reference:
            reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
            reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
        p = _validate(label, (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                              reference_rejected_logps, chosen_lengths, rejected_lengths),
                      requires_reference or zero_reference)
        if nll_chosen_logps is not None:
            p = p._replace(nll_c=nll_chosen_logps)
        if use_weighting and pair_weights is None:
            raise ValueError(f"loss {label!r} with use_weighting needs pair_weights (the step computes them)")
        scale = pair_weights.detach() if use_weighting and pair_weights is not None else None
        losses, metrics = _weighted_sum(names, weights, bound, p)
        return (losses if scale is None else losses * scale), metrics

    loss_fn.__name__ = f"loss_{label}"
    loss_fn.requires_reference = requires_reference  # type: ignore[attr-defined]
    loss_fn.ld_alpha = ld_alpha  # type: ignore[attr-defined]
    loss_fn.use_weighting = use_weighting  # type: ignore[attr-defined]
    return loss_fn


def _weighted_sum(names: list[str], weights: list[float], bound: list[Callable[[PairLogps], tuple[Tensor, Metrics]]],
                  p: PairLogps) -> tuple[Tensor, Metrics]:
    """``sum_i w_i loss_i`` and the metrics of a combination (see ``get_loss``); one loss: its own."""
    if len(bound) == 1:
        losses, metrics = bound[0](p)
        return (losses if weights[0] == 1.0 else weights[0] * losses), metrics
    total: Tensor | None = None
    metrics = {}
    for n, w, fn in zip(names, weights, bound, strict=True):
        losses, m = fn(p)
        total = w * losses if total is None else total + w * losses
        for k, v in m.items():
            metrics.setdefault(k, v)
        metrics[f"loss/{n}"] = losses.detach()
    assert total is not None
    return total, metrics


def get_loss(
    name: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    *,
    reference_free: bool = False,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    **shared: Any,
) -> LossFn:
    """Look up a loss (or a weighted sum of several) by name and bind its parameters.

    Returns ``fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps, chosen_lengths, rejected_lengths) -> (losses [num_pairs], metrics)``.

    One name: ``get_loss("sigmoid", beta=0.1)``. Several: ``get_loss(["sigmoid", "sft"],
    loss_weights=[1.0, 0.5], params={"sigmoid": {"beta": 0.1}})``; ``losses = sum_i w_i loss_i``.
    Keyword parameters (``shared``) go to every listed loss that has a parameter of that name (it is
    an error if none has); ``params[name]`` overrides them for that loss. Metrics of a combination:
    those of the first loss, plus keys only later losses have (e.g. ``nll``), plus ``loss/<name>``
    (unweighted) per loss. Unknown names, parameters or out-of-range values raise ValueError.

    Options of the whole loss (TRL's DPOConfig names), read by the step (``prefixpo.step.pair_losses``)
    from the returned function's attributes of the same names:

    - ``reference_free``: the reference log-probs are taken as 0 (the function accepts None for them
      and ``loss_fn.requires_reference`` is False), as the DPO reference code's ``reference_free``.
    - ``ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv:2409.06411): the step passes, for each side of a
      pair, ``sum of its first min(len_c, len_r) token log-probs + ld_alpha * sum of the rest``
      (policy and reference alike) instead of the plain sums. In [0, 1]; None is off (= 1).
    - ``use_weighting`` (WPO, Zhou et al. 2024, arXiv:2406.11827, eq. 2): the step passes
      ``pair_weights = w_c * w_r`` (detached), ``w = exp(mean over the response's tokens of
      log p(token) - log sum_v p(v)^2)``, and each pair's loss is multiplied by it.
    """
    names = _check_names(name)
    weights = _check_weights(names, loss_weights)
    bound = _bind_all(names, dict(params or {}), shared)
    _check_options(names, reference_free, ld_alpha, use_weighting)
    requires_reference = loss_requires_reference(names) and not reference_free
    if any(LOSSES[n].listwise for n in names):
        if len(names) > 1:
            raise ValueError(f"the listwise loss has one loss per group, not per pair: it cannot be combined "
                             f"with other losses ({names})")
        if ld_alpha is not None or use_weighting:
            raise ValueError("ld_alpha and use_weighting are per-pair options; the listwise loss takes neither")
        return _listwise_fn(names[0], bound[0], requires_reference)
    zero_reference = reference_free and loss_requires_reference(names)
    return _pairwise_fn(names, weights, bound, requires_reference, zero_reference, ld_alpha, use_weighting)
