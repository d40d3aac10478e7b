"""`prefixpo bench` on CPU: the four modes train the same pairs, count tokens consistently, and
give the same losses (tiny model, dense backend in place of flex)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import CONFIGS

from prefixpo.bench.harness import bench_step, layout_step, micro_batch_triples, rank_idle
from prefixpo.bench.layouts import MODES
from prefixpo.bench.models import build_models, model_config, set_mode_attention
from prefixpo.bench.profiles import sample_groups
from prefixpo.cli import main
from prefixpo.layout import Group
from prefixpo.losses import get_loss
from prefixpo.reference import reference_from_model
from prefixpo.step import preference_step

TINY = str(CONFIGS / "tiny-llama.json")
PROFILES = {
    "defaults": {"sigma": 0.5, "min_tokens": 2, "seed": 0, "num_examples": 64},
    "profiles": {"small": {"median_overall": 40, "ratio": 1.5, "max_prompt": 60, "max_length": 90},
                 "long-prompt": {"median_overall": 50, "ratio": 6, "max_prompt": 80, "max_length": 100}},
    "models": {},
}
CAPACITY, PAIRS, MICRO = 256, 6, 4


@pytest.fixture(scope="module")
def steps() -> list[list[Group]]:
    groups = sample_groups(PROFILES, "small", vocab_size=512, num_examples=3 * PAIRS, seed=0)
    return [groups[i:i + PAIRS] for i in range(0, len(groups), PAIRS)]


def test_modes_lay_out_the_same_pairs_and_tokens(steps):
    for s, groups in enumerate(steps):
        expected = Counter((tuple(g.prompt_ids), tuple(g.response_ids[0]), tuple(g.response_ids[1])) for g in groups)
        separate_tokens = sum(len(g.prompt_ids) * 2 + len(g.response_ids[0]) + len(g.response_ids[1]) for g in groups)
        shared_tokens = sum(g.num_tokens for g in groups)
        for mode in MODES:
            mbs = layout_step(mode, groups, CAPACITY, MICRO, seed=s)
            assert Counter(t for mb in mbs for t in micro_batch_triples(mb)) == expected, mode
            tokens = sum(mb.tokens for mb in mbs)
            assert tokens == (shared_tokens if mode.startswith("shared") else separate_tokens), mode
            assert sum(mb.padded_tokens for mb in mbs) >= tokens
            assert sum(mb.scored for mb in mbs) == sum(len(r) for g in groups for r in g.response_ids)
            if mode.endswith("packed"):
                assert all(mb.batch.shape[0] == 1 and mb.batch.shape[1] in (64 * 2, 256) for mb in mbs), mode


def test_bench_step_split_by_micro_batch_is_one_preference_step(steps):
    """The bench times each micro-batch apart (preference_step per micro-batch, given the step's pair
    count); loss and gradients equal those of one preference_step over the whole step."""
    policy, reference = build_models(model_config(TINY, PROFILES), torch.device("cpu"), torch.float32, seed=0)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss_fn = get_loss("sigmoid", beta=0.1)
    for mode in ("shared", "shared-packed"):
        set_mode_attention([policy, reference], mode, "sdpa")
        mbs = layout_step(mode, steps[0], CAPACITY, MICRO)
        assert len(mbs) > 1
        policy.zero_grad(set_to_none=True)
        loss, _ = bench_step(policy, reference, mbs, loss_fn, PAIRS)
        grads = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad(set_to_none=True)
        expected = preference_step(policy, [mb.batch for mb in mbs], loss_fn, reference_from_model(reference))
        assert abs(float(loss) - expected.loss) < 1e-6 and expected.count == PAIRS
        for g, p in zip(grads, policy.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_rank_idle_of_dealt_micro_batches():
    # two ranks; the trainer's deal pairs the 30- and 10-token rows against the two 20-token ones
    assert rank_idle([3.0, 1.0, 2.0, 2.0], [30, 10, 20, 20], ranks=2, seed=0) == pytest.approx(0.0)
    # one long row cannot be split: the other rank waits 1 - (4 + 1) / 2 / 4
    assert rank_idle([4.0, 1.0], [40, 10], ranks=2, seed=0) == pytest.approx(1 - 2.5 / 4)
    assert rank_idle([4.0, 1.0], [40, 10], ranks=1, seed=0) == 0.0


def test_bench_cli_all_modes_agree(tmp_path):
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES))
    out = tmp_path / "bench.jsonl"
    code = main(["bench", "--profile", "small", "--model", TINY, "--profiles", str(profiles), "--device", "cpu",
                 "--steps", "2", "--warmup", "1", "--capacity", str(CAPACITY), "--pairs-per-step", str(PAIRS),
                 "--micro-pairs", str(MICRO), "--lr", "1e-3", "--json", str(out)])
    assert code == 0
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(MODES)
    sep, shr = rows["separate"], rows["shared-packed"]
    assert rows["separate-packed"]["tokens_per_step"] == sep["tokens_per_step"]
    assert rows["shared"]["tokens_per_step"] == shr["tokens_per_step"]
    assert sep["tokens_per_step"] / shr["tokens_per_step"] == pytest.approx(sep["ideal_token_ratio"], rel=0.2)
    for r in rows.values():
        assert r["pairs_per_step"] == PAIRS and r["timed_steps"] == 2 and r["recompiles_after_warmup"] == 0
        assert r["scored_tokens_per_step"] == sep["scored_tokens_per_step"]
        assert r["pairs_per_s"] > 0 and r["padded_tokens_per_step"] >= r["tokens_per_step"]
        # same weights and pairs: same log-probs and losses, also after optimizer steps (lr 1e-3)
        assert r["losses"] == pytest.approx(sep["losses"], abs=1e-4)
        assert r["policy_logps"] == pytest.approx(sep["policy_logps"], rel=1e-5)
        assert r["mask_build_ms_per_step"] is None if r["mode"] == "separate" else r["mask_build_ms_per_step"] > 0
    assert sep["losses"][1] != pytest.approx(sep["losses"][0], abs=1e-4)  # the steps did train
    assert main(["bench", "--table-from", str(out)]) == 0


def test_attention_microbenchmark_cpu_smoke(tmp_path, monkeypatch):
    from prefixpo.bench import attention

    monkeypatch.setattr(attention, "GROUP", 32)  # two documents / groups in a row of 64, and a 2-token tail at 66
    out = tmp_path / "attention.jsonl"
    assert main(["bench", "--attention", "--device", "cpu", "--lengths", "64", "66", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = list(map(json.loads, out.read_text().splitlines()))
    tail = [r for r in rows if r["length"] == 66]
    assert all(r["out_max_abs_err"] < 1e-4 for r in tail) and all(r["grad_max_abs_err"] < 1e-4 for r in tail
                                                                   if r["method"] != "flex")
    assert {r["tokens"] for r in tail if r["method"] == "varlen" and r["mask"] == "shared-prefix"} == {98}
    rows = [r for r in rows if r["length"] == 64]
    assert {(r["mask"], r["method"]) for r in rows} == {
        ("causal", "flex"), ("causal", "sdpa-flash"), ("causal", "sdpa-dense"), ("causal", "varlen"),
        ("packed-causal", "flex"), ("packed-causal", "sdpa-dense"), ("packed-causal", "varlen"),
        ("shared-prefix", "flex"), ("shared-prefix", "sdpa-dense"), ("shared-prefix", "varlen")}
    # every method, varlen's sequences mapped back to the row included, against the fp32 dense path
    assert all(r["out_max_abs_err"] < 1e-4 and r["grad_max_abs_err"] < 1e-4 for r in rows if r["method"] != "flex")
    assert all(r["out_max_abs_err"] < 1e-4 for r in rows)
    pairs = {r["mask"]: r["allowed_pairs"] for r in rows}
    assert pairs["shared-prefix"] < pairs["packed-causal"] < pairs["causal"] == 64 * 65 // 2
    assert pairs["packed-causal"] == 2 * 32 * 33 // 2
    tokens = {(r["mask"], r["method"]): r["tokens"] for r in rows}
    assert tokens["shared-prefix", "varlen"] == 96 and tokens["shared-prefix", "flex"] == 64  # prompts copied
