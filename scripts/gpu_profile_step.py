"""A kernel-time profile of one benchmark step: docs/benchmarks.md "Why these settings" (a profile
kept in docs/results/profile-shared-packed-h100-before.txt). Builds the llama-1b shape with random
weights (``bench.models``), lays out capybara-profile steps as ``prefixpo bench`` does
(``bench.harness.layout_step``), runs three steps, then profiles the fourth with torch.profiler and
prints its kernels by GPU time. Needs one CUDA GPU. From the repository root:

    PYTHONPATH=src python scripts/gpu_profile_step.py [--profile capybara] [--mode shared-packed] [--eager]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from prefixpo.bench.harness import bench_step, layout_step
from prefixpo.bench.layouts import default_pairs_per_step, fit_both_layouts
from prefixpo.bench.models import build_models, model_config, set_compiled, set_mode_attention
from prefixpo.bench.profiles import load_profiles, sample_groups
from prefixpo.losses import get_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default=None)
    parser.add_argument("--profile", default="capybara")
    parser.add_argument("--mode", default="shared-packed")
    parser.add_argument("--rows-per-step", type=int, default=4)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    profiles = load_profiles(args.profiles)
    device = torch.device("cuda")
    policy, reference = build_models(model_config("llama-1b", profiles), device, torch.bfloat16)
    set_mode_attention([policy, reference], args.mode, "flex")
    set_compiled([policy, reference], not args.eager)
    groups = [fit_both_layouts(g, 8192) for g in sample_groups(profiles, args.profile, 128256, num_examples=512)]
    per_step = default_pairs_per_step(groups, args.rows_per_step * 8192, 4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)
    loss_fn = get_loss("sigmoid", beta=0.1)
    plans = [[mb.to(device) for mb in layout_step(args.mode, groups[s * per_step:(s + 1) * per_step], 8192, 4, 8,
                                                   seed=s)] for s in range(4)]

    def step(plan):
        optimizer.zero_grad(set_to_none=True)
        bench_step(policy, reference, plan, loss_fn, sum(mb.num_pairs for mb in plan))
        optimizer.step()

    for plan in plans[:3]:
        step(plan)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(plans[3])
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events)
    print(f"{args.profile} {args.mode} compiled={not args.eager}: {per_step} pairs, "
          f"{len(plans[3])} rows, CUDA kernel time {total / 1e3:.1f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
