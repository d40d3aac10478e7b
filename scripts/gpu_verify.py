"""The GPU verification of docs/verification.md "On the GPU (H100)": prefixpo's FlexAttention path
(compiled, forward and backward) against separate sequences through transformers' own attention and
against prefixpo's dense-mask path, fp32 and bf16, on the tiny model of every verified architecture
(examples/configs/) and on the ``llama-1b`` shape of the benchmark profiles (random weights,
capybara-like lengths). Writes the table's numbers as JSON (docs/results/verification-h100.json)
and prints the table. Needs one CUDA GPU. From the repository root:

    PYTHONPATH=src python scripts/gpu_verify.py --out verification.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import transformers

from prefixpo.bench.profiles import load_profiles
from prefixpo.layout import Group, collate_groups
from prefixpo.modeling import apply_prefix_attention, compute_logps, load_model
from prefixpo.verify import TOLERANCES, compare, random_groups, verification_loss

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
ROOT = Path(__file__).resolve().parents[1]


def shared_pass(model, groups, backend):
    """Token log-probs and gradients of the verification loss through one backend."""
    apply_prefix_attention(model, backend, self_check=False)
    model.zero_grad(set_to_none=True)
    batch = collate_groups(groups, pad_to_multiple_of=128).to("cuda")
    out = compute_logps(model, batch, chunk_size=256)
    per_response = list(out.token_logps.split(batch.response_lengths.tolist()))
    verification_loss(groups, per_response).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    token_logps = out.token_logps.detach().double()
    sums = torch.zeros(batch.num_responses, dtype=torch.float64, device="cuda").index_add(0, batch.scored_response, token_logps)
    return token_logps, sums, grads


def flex_vs_dense(model, groups):
    dense_tok, dense_sum, dense_grads = shared_pass(model, groups, "sdpa")
    flex_tok, flex_sum, flex_grads = shared_pass(model, groups, "flex")
    rel = max(((flex_grads[n] - g).abs().max() / g.abs().max()).item() for n, g in dense_grads.items())
    return {"logps_sum_max_abs": (flex_sum - dense_sum).abs().max().item(),
            "token_max_abs": (flex_tok - dense_tok).abs().max().item(),
            "token_mean_abs": (flex_tok - dense_tok).abs().mean().item(),
            "grads_max_rel": rel}


def result_row(model: str, dtype: str, result, flex_vs_dense_diffs: dict, started: float) -> dict:
    return {"model": model, "dtype": dtype,
            "flex_vs_separate": {"logps_sum_max_abs": result.max_abs_logps,
                                 "logps_per_token_max_abs": result.max_abs_logps_per_token,
                                 "grads_max_rel": result.max_rel_grads,
                                 "within_tolerance": result.within(getattr(torch, dtype))},
            "flex_vs_dense": flex_vs_dense_diffs, "seconds": round(time.time() - started, 1)}


def llama_1b_groups(vocab: int, seed: int = 0) -> list[Group]:
    """Capybara-like lengths: prompts ~700 tokens, responses ~450."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [(1, [300, 250]), (700, [450, 430]), (1100, [600, 380]), (260, [140, 900])]
    return [Group(torch.randint(0, vocab, (p,), generator=gen).tolist(),
                  [torch.randint(0, vocab, (r,), generator=gen).tolist() for r in rs]) for p, rs in lengths]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="verification.json")
    parser.add_argument("--profiles", default=None,
                        help="a profiles JSON file with the model shapes (default: the packaged prefixpo/bench/profiles.json)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset, e.g. tiny-llama,llama-1b (default: every tiny model and llama-1b)")
    args = parser.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    torch._dynamo.config.cache_size_limit = 64
    env = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    print(json.dumps(env))
    rows = []
    for arch in ARCHITECTURES:
        if wanted is not None and f"tiny-{arch}" not in wanted:
            continue
        for dtype in ("float32", "bfloat16"):
            t0 = time.time()
            model = load_model(str(ROOT / f"examples/configs/tiny-{arch}.json"), dtype=dtype, device="cuda", seed=0, attn_implementation="eager")
            groups = random_groups(model.get_output_embeddings().weight.shape[0], 4, 2, seed=0)
            result = compare(model, groups, "flex", with_grads=True, chunk_size=256)
            fd = flex_vs_dense(model, groups)
            rows.append(result_row(f"tiny-{arch}", dtype, result, fd, t0))
            print(json.dumps(rows[-1]), flush=True)
    # the llama-1b shape of the profiles, random weights, bf16 and fp32, capybara-like lengths
    spec = load_profiles(args.profiles)["models"]["llama-1b"]
    cfg = {k: v for k, v in spec.items() if k != "architecture"}
    cfg["model_type"] = "llama"
    path = Path("/tmp/llama-1b.json")
    path.write_text(json.dumps(cfg))
    for dtype in ("bfloat16", "float32") if wanted is None or "llama-1b" in wanted else ():
        t0 = time.time()
        model = load_model(str(path), dtype=dtype, device="cuda", seed=0)
        groups = llama_1b_groups(cfg["vocab_size"])
        result = compare(model, groups, "flex", with_grads=True, chunk_size=1024)
        fd = flex_vs_dense(model, groups)
        rows.append({"model": "llama-1b", "dtype": dtype,
                     "flex_vs_separate": {"logps_sum_max_abs": result.max_abs_logps,
                                          "logps_per_token_max_abs": result.max_abs_logps_per_token,
                                          "grads_max_rel": result.max_rel_grads,
                                          "within_tolerance": result.within(getattr(torch, dtype))},
                         "flex_vs_dense": fd, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"env": env, "tolerances": {str(k): v for k, v in TOLERANCES.items()},
                                          "rows": rows}, indent=1))
    print(f"\n{'model':<13} {'dtype':<9} {'vs separate: sum':>16} {'per tok':>9} {'grads rel':>9} "
          f"{'ok':>3} | {'flex vs dense: tok max':>22} {'grads rel':>9}")
    for r in rows:
        s, d = r["flex_vs_separate"], r["flex_vs_dense"]
        print(f"{r['model']:<13} {r['dtype']:<9} {s['logps_sum_max_abs']:>16.2e} {s['logps_per_token_max_abs']:>9.2e} "
              f"{s['grads_max_rel']:>9.2e} {'y' if s['within_tolerance'] else 'N':>3} | "
              f"{d['token_max_abs']:>22.2e} {d['grads_max_rel']:>9.2e}")


if __name__ == "__main__":
    main()
