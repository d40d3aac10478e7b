"""FlexAttention alone on a real packed row: the table of docs/benchmarks.md "Why these settings"
(raw: docs/results/flex-tune-h100.jsonl), behind the static compiled layers, the one-code predicate
and ``modeling.TUNED_FLEX_OPTIONS``. One llama-1b attention call (32 query heads, 8 key/value
heads, head dim 64, bf16) on an 8192-token row packed with capybara-length groups, forward and
forward+backward (CUDA-event medians), for compile modes, kernel options and two ways of writing
the mask predicate; SDPA flash (plain causal over the row) as the yardstick. Needs one CUDA GPU.
From the repository root:

    PYTHONPATH=src python scripts/gpu_flex_tune.py [--out flex-tune.jsonl]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prefixpo.bench.profiles import load_profiles, sample_groups
from prefixpo.layout import build_batch, layout_group
from prefixpo.masks import prefix_mask_mod
from prefixpo.packing import pack

FWD = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}
OPTIONS = {
    "default": None,
    "m128n128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "fwd-m128n128w8s2": FWD,
    "fwd-m64n64w4s3": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    "fwd+bwd-64.128.128.64w8s3": {**FWD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                  "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 3},
    "fwd+bwd-64.128.128.64w8s2": {**FWD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                  "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2},
    "fwd+bwd-32.128.128.32w4s3": {**FWD, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                  "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "fwd+bwd-64.64.64.64w4s3": {**FWD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "fwd+bwd-64.64.64.64w8s2": {**FWD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2},
}


def code_mask_mod(doc: torch.Tensor, seg: torch.Tensor):
    """The same rule from one code per token: ``doc * 1024 + segment``; k is visible to q iff
    k <= q and k's code is q's own or q's group prompt (code with segment 0)."""
    code = (doc.long() * 1024 + seg.long()).int()

    def mask_mod(b, h, q, k):
        cq, ck = code[b, q], code[b, k]
        return (k <= q) & ((ck == cq) | (ck == (cq & ~1023)))

    return mask_mod


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default=None)
    parser.add_argument("--profile", default="capybara")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 256
    profiles = load_profiles(args.profiles)
    groups = sample_groups(profiles, args.profile, 128256, num_examples=64)
    groups = [g for g in groups if g.num_tokens <= args.length]
    row = max(pack([g.num_tokens for g in groups], args.length, seed=0), key=lambda r: sum(groups[i].num_tokens
                                                                                        for i in r))
    batch = build_batch([[layout_group(groups[i]) for i in row]], row_length=args.length).to("cuda")
    T = args.length
    rule = prefix_mask_mod(batch.document_ids, batch.segment_ids, batch.position_ids)
    masks = {"rule": create_block_mask(rule, 1, None, T, T, device="cuda"),
             "code": create_block_mask(code_mask_mod(batch.document_ids, batch.segment_ids), 1, None, T, T,
                                       device="cuda")}
    dense = rule(torch.arange(1)[:, None, None].cuda(), None, torch.arange(T, device="cuda")[None, :, None],
                 torch.arange(T, device="cuda")[None, None, :])
    pairs = int(dense.sum())
    assert torch.equal(masks["rule"].to_dense(), masks["code"].to_dense())
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    go = torch.randn(1, 32, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    fwd_flop = 4 * 32 * 64 * pairs
    print(json.dumps({"groups_in_row": len(row), "tokens": sum(groups[i].num_tokens for i in row),
                      "allowed_pairs": pairs, "density": pairs / (T * (T + 1) / 2),
                      "blocks": masks["rule"].sparsity() if hasattr(masks["rule"], "sparsity") else None}))
    reference = None
    results = []

    def record(name, fwd_ms, both_ms, out=None):
        row = {"variant": name, "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(both_ms, 3),
               "fwd_tflops": fwd_flop / fwd_ms / 1e9, "fwd_bwd_tflops": 3.5 * fwd_flop / both_ms / 1e9}
        if out is not None and reference is not None:
            row["max_abs_vs_first"] = float((out.float() - reference.float()).abs().max())
        results.append(row)
        print(json.dumps(row), flush=True)

    variants = [("static", "rule", "default"), ("static", "code", "default")]
    variants += [("static", "code", name) for name in OPTIONS if name != "default"]
    for dyn, mask_name, opt in variants:
        name = f"{dyn}/{mask_name}/{opt}"
        try:
            attend = torch.compile(flex_attention, dynamic=dyn == "dynamic")
            if dyn == "dynamic":  # compile a second length first, as in training, so the kernel is symbolic
                h = T // 2
                small = create_block_mask(lambda b, hh, qq, kk: kk <= qq, 1, None, h, h, device="cuda")
                attend(q[:, :, :h].detach(), k[:, :, :h].detach(), v[:, :, :h].detach(), block_mask=small,
                       enable_gqa=True).sum()
            kw = {"block_mask": masks[mask_name], "enable_gqa": True, "kernel_options": OPTIONS[opt]}
            with torch.no_grad():
                out = attend(q, k, v, **kw)
            if reference is None:
                reference = out
            fwd = timed(lambda a=attend, o=kw: a(q, k, v, **o))

            def both(a=attend, o=kw):
                a(q, k, v, **o).backward(go)

            record(name, fwd, timed(both), out)
        except Exception as err:  # a kernel option the installed version rejects
            print(json.dumps({"variant": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}), flush=True)
        torch._dynamo.reset()
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    kf, vf = k.repeat_interleave(4, 1).detach().requires_grad_(), v.repeat_interleave(4, 1).detach().requires_grad_()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        fwd = timed(lambda: sdpa(q, kf, vf, is_causal=True))
        both = timed(lambda: sdpa(q, kf, vf, is_causal=True).backward(go))
    causal_flop = 4 * 32 * 64 * T * (T + 1) / 2
    row = {"variant": "sdpa-flash causal (whole row, kv repeated)", "fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(both, 3),
           "fwd_tflops": causal_flop / fwd / 1e9, "fwd_bwd_tflops": 3.5 * causal_flop / both / 1e9}
    results.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
