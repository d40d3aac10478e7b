"""Every TRL 1.16 DPO loss type and loss option, under TRL's name, against TRL's own loss code.

TRL's ``DPOTrainer._compute_loss`` maps a model's per-token log-probs to the loss and logged rewards.
It is called here unbound, on a namespace holding the trainer attributes it reads, with stand-in
policy and reference "models" that return chosen per-token log-probs (and, for WPO, per-token
``log sum_v p(v)^2``). prefixpo gets the same per-token values as a ``ResponseLogps`` and goes
through ``prefixpo.step.pair_losses`` (where ``ld_alpha`` and ``use_weighting`` are applied).
Compared: per-pair loss and rewards (TRL run on one pair at a time), the batch-mean loss and the
gradient of the batch mean w.r.t. every policy token log-prob (1e-5 relative).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.dpo_config import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from prefixpo.config import TrainConfig  # noqa: E402
from prefixpo.logprobs import ResponseLogps  # noqa: E402
from prefixpo.losses import LOSSES, get_loss  # noqa: E402
from prefixpo.pairs import BatchPairs  # noqa: E402
from prefixpo.step import pair_losses  # noqa: E402

TRL_DEFAULTS = DPOConfig.__dataclass_fields__


def trl_loss_types() -> list[str]:
    """TRL's loss types, read from its DPOConfig help text (its list of valid values)."""
    text = TRL_DEFAULTS["loss_type"].metadata["help"]
    listed = text.split("Possible values are:")[1].split(". If")[0]
    return [part.strip(" `'.") for part in listed.replace(" and ", ",").split(",") if part.strip(" `'.")]


TRL_LOSSES = trl_loss_types()


def test_trl_loss_types_are_read_and_all_registered():
    assert len(TRL_LOSSES) == 15 and "sigmoid_norm" in TRL_LOSSES and "aot_unpaired" in TRL_LOSSES
    assert set(TRL_LOSSES) <= set(LOSSES)


class _StandIn(torch.nn.Module):
    """A "model" whose forward returns given per-token values, as TRL's fused LM head outputs."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps: torch.Tensor, mask: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.token_logps, self.mask, self.log_sum_sq = token_logps, mask, log_sum_sq

    def forward(self, **kwargs):
        logps = self.token_logps * self.mask  # positions outside the completion are 0, as for label -100
        zeros = torch.zeros_like(logps.detach())
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=self.log_sum_sq, aux_loss=None)


def make_case(n_pairs: int = 5, seed: int = 0, dtype=torch.float64):
    """Per-token policy/reference log-probs and log sum p^2 for n pairs, lengths 1..9."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (2, n_pairs), generator=g)  # [chosen; rejected]
    tokens = []
    for i in range(n_pairs):
        for side in range(2):
            n = int(lengths[side, i])
            pol = -(0.05 + 2.0 * torch.rand(n, generator=g, dtype=dtype))
            ref = pol + 0.3 * torch.randn(n, generator=g, dtype=dtype)
            sq = -(0.5 + torch.rand(n, generator=g, dtype=dtype))
            tokens.append((pol, ref.clamp(max=-1e-3), sq))
    return lengths, tokens


def trl_run(lengths, tokens, pairs: list[int], **options):
    """TRL's loss on the given pairs: (loss, logged metrics, per-token policy gradients per response)."""
    width = 1 + int(lengths.max())
    rows = [(i, side) for side in range(2) for i in pairs]  # TRL's batch: all chosen, then all rejected
    dtype = tokens[0][0].dtype
    pol = torch.zeros(len(rows), width - 1, dtype=dtype)
    ref = torch.zeros_like(pol)
    sq = torch.zeros_like(pol)
    completion = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (i, side) in enumerate(rows):
        p, r, s = tokens[2 * i + side]
        pol[row, : len(p)], ref[row, : len(p)], sq[row, : len(p)] = p, r, s
        completion[row, 1 : 1 + len(p)] = 1
    if options.get("reference_free"):
        ref = torch.zeros_like(ref)
    pol.requires_grad_()
    shift = completion[:, 1:].to(dtype)
    model = _StandIn(pol, shift, sq)
    ns = SimpleNamespace(
        model=model, ref_model=_StandIn(ref, shift), accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        args=SimpleNamespace(discopop_tau=options.get("discopop_tau", TRL_DEFAULTS["discopop_tau"].default),
                             gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, precompute_ref_logps=False,
        loss_types=[options["loss_type"]] if isinstance(options["loss_type"], str) else options["loss_type"],
        beta=options.get("beta", 0.1), label_smoothing=options.get("label_smoothing", 0.0),
        ld_alpha=options.get("ld_alpha"), use_weighting=options.get("use_weighting", False),
        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=options.get("f_alpha_divergence_coef", 0.5),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    ns.loss_weights = options.get("loss_weights") or [1.0] * len(ns.loss_types)
    inputs = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
              "attention_mask": torch.ones(len(rows), width, dtype=torch.long), "completion_mask": completion}
    loss = DPOTrainer._compute_loss(ns, model, inputs, return_outputs=False)
    try:
        loss.backward()
    except RuntimeError as err:  # TRL 1.16: WPO's in-place `*=` on hinge's relu output breaks its backward
        assert "inplace operation" in str(err) and options.get("use_weighting")
        return loss.detach(), {k: v[-1] for k, v in ns._metrics["train"].items()}, {}
    grads = {}
    for row, (i, side) in enumerate(rows):
        grads[2 * i + side] = pol.grad[row, : int(lengths[side, i])]
    metrics = {k: v[-1] for k, v in ns._metrics["train"].items()}
    return loss.detach(), metrics, grads


def prefixpo_run(lengths, tokens, pairs: list[int], loss_type, params: dict, options: dict):
    """prefixpo's per-pair losses, metrics and per-token gradients of their mean, via the step."""
    order = [2 * i + side for i in pairs for side in range(2)]
    pol = torch.cat([tokens[k][0] for k in order]).clone().requires_grad_()
    ref = torch.cat([tokens[k][1] for k in order])
    sq = torch.cat([tokens[k][2] for k in order])
    counts = torch.tensor([len(tokens[k][0]) for k in order])
    response = torch.repeat_interleave(torch.arange(len(order)), counts)

    def per_response(t: torch.Tensor) -> ResponseLogps:
        sums = torch.zeros(len(order), dtype=t.dtype).index_add(0, response, t)
        return ResponseLogps(sums=sums, means=sums / counts, counts=counts, token_logps=t)

    policy = per_response(pol)
    policy.token_log_sum_sq = sq
    reference = None if options.get("reference_free") else per_response(ref)
    idx = torch.arange(len(pairs))
    batch_pairs = BatchPairs(2 * idx, 2 * idx + 1, idx, [])
    loss_fn = get_loss(loss_type, **params, **{k: v for k, v in options.items()
                                                if k in ("reference_free", "ld_alpha", "use_weighting")})
    losses, metrics = pair_losses(policy, reference, batch_pairs, loss_fn)
    losses.mean().backward()
    offsets = torch.cumsum(counts, 0) - counts
    grads = {k: pol.grad[int(o): int(o) + int(c)] for k, o, c in zip(order, offsets, counts, strict=True)}
    return losses.detach(), metrics, grads


def prefixpo_params(loss_type, options: dict) -> dict:
    """The get_loss parameters a TRL config maps to (TrainConfig.loss_kwargs does this for a run)."""
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    has = lambda key: any(key in LOSSES[n].defaults for n in names)  # noqa: E731
    params = {}
    if has("beta"):
        params["beta"] = options.get("beta", 0.1)
    for key in ("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"):
        if key in options and has(key):
            params[key] = options[key]
    if "discopop_tau" in options:
        params["tau"] = options["discopop_tau"]
    if "sigmoid" in names and "label_smoothing" in params:
        params.pop("label_smoothing")  # TRL 1.16's sigmoid ignores it; prefixpo would smooth
    if "loss_weights" in options:
        params["loss_weights"] = options["loss_weights"]
    return params


def close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    assert diff <= 1e-5 * max(scale, 1e-3), f"{what}: max difference {diff:.3g} (scale {scale:.3g})"
    return diff / max(scale, 1e-12)


BATCH_COUPLED = {"aot", "aot_unpaired"}  # sort across the batch: per-pair values are quantiles
TOKEN_MEAN_OVER_BATCH = {"sft"}  # TRL: mean over all chosen tokens of the batch; prefixpo: per response

CASES: list[tuple[str, dict]] = [(t, {}) for t in TRL_LOSSES]
CASES += [
    ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.05}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}),  # TRL ignores it: prefixpo's sigmoid is not given it
]
for f in ("forward_kl", "js_divergence", "alpha_divergence"):
    for t in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"):
        CASES.append((t, {"f_divergence_type": f}))
CASES.append(("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}))
for t in TRL_LOSSES:
    CASES.append((t, {"ld_alpha": 0.4}))
    CASES.append((t, {"reference_free": True}))
    if t not in BATCH_COUPLED:
        CASES.append((t, {"use_weighting": True}))
CASES.append((["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}))  # MPO's combination
CASES.append((["sigmoid", "sft"], {"loss_weights": [1.0, 0.5], "ld_alpha": 0.5, "use_weighting": True}))

MEASURED: dict[str, float] = {}
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")
# sft alone: prefixpo's needs no reference and logs pi / len as rewards; TRL's DPOTrainer still logs
# beta (pi - ref) (docs/losses.md). Its loss and gradients are compared.


def case_id(case) -> str:
    name, options = case
    name = "+".join(name) if isinstance(name, list) else name
    return name + "".join(f"-{k}={v}" for k, v in options.items() if k != "loss_weights")


def _exo(options: dict) -> dict:
    return options if "label_smoothing" in options else {**options, "label_smoothing": 1e-3}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_trl(case):
    loss_type, options = case
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if "exo_pair" in names:  # TRL refuses label_smoothing 0 for exo_pair; prefixpo's default is TRL's 1e-3
        options = _exo(options)
    options = {"loss_type": loss_type, **options}
    dtype = torch.float32 if options.get("f_divergence_type") == "alpha_divergence" else torch.float64
    lengths, tokens = make_case(dtype=dtype)
    n = lengths.shape[1]
    params = prefixpo_params(loss_type, options)
    worst = 0.0
    coupled = bool(set(names) & BATCH_COUPLED)
    # one pair at a time: per-pair loss, rewards, logps and gradients
    for i in range(n):
        want_loss, want, want_grads = trl_run(lengths, tokens, [i], **options)
        losses, metrics, grads = prefixpo_run(lengths, tokens, [i], loss_type, params, options)
        worst = max(worst, close(losses, want_loss.reshape(1), f"loss of pair {i}"))
        for key in REWARD_KEYS if names != ["sft"] else ("logps/chosen", "logps/rejected"):
            worst = max(worst, close(metrics[key], torch.tensor([want[key]]), f"{key} of pair {i}"))
        for k, g in want_grads.items():
            worst = max(worst, close(grads[k], g, f"gradient of response {k}"))
    # the whole batch: its mean loss and the gradients of the mean (sorting losses couple the pairs)
    if not set(names) & TOKEN_MEAN_OVER_BATCH:
        want_loss, want, want_grads = trl_run(lengths, tokens, list(range(n)), **options)
        losses, metrics, grads = prefixpo_run(lengths, tokens, list(range(n)), loss_type, params, options)
        worst = max(worst, close(losses.mean(), want_loss, "batch-mean loss"))
        if not coupled and names != ["sft"]:
            for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
                worst = max(worst, close(metrics[key].mean(), torch.tensor(want[key]), f"batch mean {key}"))
        for k, g in want_grads.items():
            worst = max(worst, close(grads[k], g, f"gradient of response {k} in the batch"))
    MEASURED[case_id(case)] = worst
    print(f"\nmax relative difference {case_id(case)}: {worst:.2e}")


def test_trl_rejections_are_ours():
    """Options TRL refuses are refused here too, naming the option."""
    with pytest.raises(ValueError, match="f_divergence_type"):
        get_loss("bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="use_weighting"):
        get_loss("aot", use_weighting=True)
    with pytest.raises(ValueError, match="ld_alpha"):
        get_loss("sigmoid", ld_alpha=1.5)


def test_trl_defaults_are_ours():
    """The config keys named after DPOConfig options have DPOConfig's defaults (those prefixpo keeps)."""
    cfg = TrainConfig()
    for key in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha",
                "use_weighting", "reference_free"):
        if key in TRL_DEFAULTS:
            assert getattr(cfg, key) == TRL_DEFAULTS[key].default, key
        else:  # reference_free: TRL 1.16 has none; older TRL and the DPO reference code default to False
            assert getattr(cfg, key) is False
    assert LOSSES["bco_pair"].defaults["delta"] == 0.0  # TRL 1.16: no reward baseline
    assert LOSSES["discopop"].defaults["tau"] == TRL_DEFAULTS["discopop_tau"].default


def test_wpo_log_sum_sq_matches_the_full_softmax():
    from prefixpo.logprobs import scored_token_log_sum_sq

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    probs = torch.softmax(hidden @ weight.T, dim=-1)
    torch.testing.assert_close(scored_token_log_sum_sq(hidden, weight, chunk_size=3), torch.log((probs ** 2).sum(-1)))
