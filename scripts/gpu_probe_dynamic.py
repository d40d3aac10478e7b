"""Probe: compile time and correctness of FlexAttention + block-mask construction with static vs
dynamic shapes over the packed bucket lengths (fwd+bwd, bf16, llama-1b attention shape)."""

import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

mode = sys.argv[1]  # "static" or "dynamic"
torch._dynamo.config.cache_size_limit = 64
dynamic = mode == "dynamic"
attend = torch.compile(flex_attention, dynamic=dynamic)
build = torch.compile(create_block_mask, dynamic=dynamic)
for length in (2048, 4096, 6144, 8192, 3072):
    doc = (torch.arange(length, device="cuda") // 700)
    seg = (torch.arange(length, device="cuda") % 700 > 400).long()

    def mask_mod(b, h, q, k):
        return (k <= q) & (doc[q] == doc[k]) & ((seg[k] == 0) | (seg[k] == seg[q]))  # noqa: B023

    t0 = time.time()
    bm = build(mask_mod, 1, None, length, length, device="cuda")
    q, k, v = (torch.randn(1, 32, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=i == 0)
               for i in range(3))
    k2, v2 = k[:, :8].detach(), v[:, :8].detach()
    out = attend(q, k2, v2, block_mask=bm, enable_gqa=True)
    out.sum().backward()
    torch.cuda.synchronize()
    first = time.time() - t0
    t0 = time.time()
    for _ in range(5):
        out = attend(q, k2, v2, block_mask=build(mask_mod, 1, None, length, length, device="cuda"), enable_gqa=True)
        out.sum().backward()
    torch.cuda.synchronize()
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k2.float().repeat_interleave(4, 1), v2.float().repeat_interleave(4, 1),
        attn_mask=mask_mod(0, 0, torch.arange(length, device="cuda")[:, None], torch.arange(length, device="cuda")[None]))
    err = (out.float() - dense).abs().max().item()
    print(f"{mode} T={length} first(compile+run)={first:.1f}s steady={(time.time() - t0) / 5 * 1000:.1f}ms "
          f"max_err_vs_fp32_dense={err:.3e}", flush=True)
