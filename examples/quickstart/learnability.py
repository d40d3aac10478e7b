"""Check that the quickstart task is learnable: SFT then DPO on CPU, from the library's parts only.

    python examples/quickstart/learnability.py              # about 45 s on one CPU thread

A plain loop (no trainer): groups from ``load_groups``, a random tiny Llama from
``model/config.json``, ``apply_prefix_attention(model, "sdpa")``, AdamW over ``sft_step``, then
over ``preference_step`` with the sigmoid (DPO) loss against a frozen copy of the SFT model.
Prints the eval reward accuracy (``rewards/accuracies``, the mean over eval pairs) before and
after DPO, the policy's own preference (log p(chosen) > log p(rejected), reference-free) before
SFT, after SFT and after DPO, the time of each stage, and one JSON line.

Before the first DPO step the policy is the reference, so every reward is 0 and
``rewards/accuracies`` (chosen reward > rejected reward, strictly) is 0.0, not 0.5.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def task_of(prompt: str) -> str:
    for key, name in (("last", "last"), ("first", "first"), ("backwards", "reverse"), ("reverse", "reverse"),
                      ("many", "count"), ("count", "count")):
        if key in prompt:
            return name
    return "bigger"


def batches(groups, batch_size: int, rng: random.Random, pad_id: int):
    from prefixpo.layout import collate_groups

    order = list(range(len(groups)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate_groups([groups[j] for j in order[i:i + batch_size]], pad_token_id=pad_id)


@torch.no_grad()
def evaluate(policy, reference, batch, loss_fn, tasks=None) -> dict[str, float]:
    """Mean metrics over the eval pairs, plus the policy's own preference accuracy."""
    from prefixpo.logprobs import compute_logps
    from prefixpo.modeling import build_attention_masks
    from prefixpo.step import batch_pair_indices

    pairs = batch_pair_indices(batch)
    masks = build_attention_masks(policy, batch)
    logps = compute_logps(policy, batch, masks)
    ref = compute_logps(reference, batch, masks)
    c, r = pairs.chosen_idx, pairs.rejected_idx
    losses, metrics = loss_fn(logps.sums[c], logps.sums[r], ref.sums[c], ref.sums[r], logps.counts[c], logps.counts[r])
    out = {"loss": losses.mean().item(), **{k: v.float().mean().item() for k, v in metrics.items()}}
    prefers = logps.sums[c] > logps.sums[r]
    out["policy_prefers_chosen"] = prefers.float().mean().item()
    if tasks is not None:  # accuracy per task, to see which game is learned
        acc = metrics["rewards/accuracies"]
        for name in sorted(set(tasks)):
            idx = torch.tensor([i for i, t in enumerate(tasks) if t == name])
            out[f"acc/{name}"] = acc[idx].float().mean().item()
            out[f"prefers/{name}"] = prefers[idx].float().mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-epochs", type=int, default=45)
    parser.add_argument("--sft-lr", type=float, default=1e-2)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--dpo-epochs", type=int, default=4)
    parser.add_argument("--dpo-lr", type=float, default=2e-3)
    parser.add_argument("--dpo-batch", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.1)
    # One thread: the model is tiny, and on a shared 2-core machine 2 threads ran SFT steps 5-10x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prefixpo.data import DataConfig, load_groups
    from prefixpo.layout import collate_groups
    from prefixpo.losses import get_loss
    from prefixpo.modeling import apply_prefix_attention
    from prefixpo.step import preference_step, reference_from_model, sft_step

    tokenizer = AutoTokenizer.from_pretrained(HERE / "tokenizer")
    data = {name: list(load_groups(DataConfig(str(HERE / "data" / f"{name}.jsonl"), use_cache=False,
                                               use_chat_template=True), tokenizer)[0])
            for name in ("sft_train", "pref_train", "pref_eval")}
    pad = tokenizer.pad_token_id
    eval_batch = collate_groups(data["pref_eval"], pad_token_id=pad)
    with open(HERE / "data" / "pref_eval.jsonl") as f:
        tasks = [task_of(json.loads(line)["prompt"]) for line in f]
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "model"))
    apply_prefix_attention(policy, "sdpa")
    loss_fn = get_loss("sigmoid", beta=args.beta)
    rng = random.Random(args.seed)
    report: dict = {"params": sum(p.numel() for p in policy.parameters()), **vars(args)}
    report["setup_s"] = time.perf_counter() - started

    policy.eval()
    report["prefers_chosen_init"] = evaluate(policy, policy, eval_batch, loss_fn)["policy_prefers_chosen"]

    t0 = time.perf_counter()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, weight_decay=0.0)
    steps = args.sft_epochs * -(-len(data["sft_train"]) // args.sft_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    for epoch in range(args.sft_epochs):
        losses = []
        for batch in batches(data["sft_train"], args.sft_batch, rng, pad):
            losses.append(sft_step(policy, [batch]).loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        print(f"sft epoch {epoch + 1}: loss {sum(losses) / len(losses):.3f}", flush=True)
    report["sft_s"] = time.perf_counter() - t0
    report["sft_steps"] = steps

    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.eval()
    before = evaluate(policy, reference, eval_batch, loss_fn, tasks)
    report["eval_accuracy_before_dpo"] = before["rewards/accuracies"]
    report["prefers_chosen_after_sft"] = before["policy_prefers_chosen"]
    print(f"after sft: eval {json.dumps({k: round(v, 3) for k, v in before.items()})}", flush=True)

    t0 = time.perf_counter()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    ref_fn = reference_from_model(reference)
    step = 0
    curve = []
    for _ in range(args.dpo_epochs):
        for batch in batches(data["pref_train"], args.dpo_batch, rng, pad):
            result = preference_step(policy, [batch], loss_fn, reference=ref_fn)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                policy.eval()
                m = evaluate(policy, reference, eval_batch, loss_fn)
                policy.train()
                curve.append((step, round(m["rewards/accuracies"], 3)))
                print(f"dpo step {step}: train loss {result.loss:.3f} acc "
                      f"{result.metrics['rewards/accuracies'] / result.count:.2f} | eval acc "
                      f"{m['rewards/accuracies']:.3f} margin {m['rewards/margins']:.2f}", flush=True)
    report["dpo_s"] = time.perf_counter() - t0
    report["dpo_steps"] = step
    policy.eval()
    after = evaluate(policy, reference, eval_batch, loss_fn, tasks)
    report["eval_accuracy_after_dpo"] = after["rewards/accuracies"]
    report["eval_margin_after_dpo"] = after["rewards/margins"]
    report["prefers_chosen_after_dpo"] = after["policy_prefers_chosen"]
    report["eval_accuracy_curve"] = curve
    report["eval_after_dpo"] = {k: round(v, 3) for k, v in after.items() if "/" in k and k.split("/")[0] in ("acc", "prefers")}
    report["total_s"] = time.perf_counter() - started
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in report.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
