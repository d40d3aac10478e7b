"""Locate a policy/reference disagreement under FSDP2: the same weights and one packed batch
through each way the trainer may run the model, against a plain bf16 forward without grad.

One process (a world of 1), every variant loading the same saved weights afresh:

    torchrun --nproc_per_node 1 scripts/gpu_fsdp_probe.py --model /tmp/llama-1b

Prints one line per variant (mean log-prob per token, largest token difference from the plain
forward) and one JSON line with all of them. On CPU (``--device cpu``, a small model) the flex
variants with grad are skipped: FlexAttention has no backward there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random

import torch
import torch.distributed as dist

from prefixpo.distributed import _fully_shard, shard_frozen
from prefixpo.layout import Group, build_batch, layout_group
from prefixpo.logprobs import ScoredLM, compute_logps
from prefixpo.modeling import apply_prefix_attention, build_attention_masks


def load(path: str, device: torch.device, dtype: torch.dtype, backend: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    return apply_prefix_attention(model, backend, self_check=False)


def packed_batch(vocab: int, capacity: int, seed: int = 0):
    rng = random.Random(seed)
    layouts, used = [], 0
    while True:
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(200, 1200))]
        responses = [[rng.randrange(3, vocab) for _ in range(rng.randrange(100, 600))] for _ in range(2)]
        lay = layout_group(Group(prompt, responses))
        if used + len(lay) > capacity:
            break
        layouts.append(lay)
        used += len(lay)
    return build_batch([layouts], row_length=capacity)


def fully_shard_policy(model: torch.nn.Module, device: torch.device, mixed: bool) -> ScoredLM:
    """The trainer's policy under FSDP2 without accelerate: layers, then the ScoredLM root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    fully_shard = _fully_shard()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh}
    if mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    scored = ScoredLM(model)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(scored, **kwargs)
    return scored


def accelerate_policy(model: torch.nn.Module, device: torch.device):
    """The trainer's own route: accelerate's FSDP2 prepare of a ScoredLM with fp32 master weights."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from prefixpo.distributed import apply_fsdp_hints

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
    AcceleratorState._reset_state(True)
    if device.type == "cuda":
        accelerator = accelerate.Accelerator(mixed_precision="bf16", fsdp_plugin=plugin)
    else:  # accelerate turns FSDP on for GPU types only; fully_shard itself runs on CPU (tests/fsdp_cpu.py)
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    policy = apply_fsdp_hints(ScoredLM(model))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    return policy, accelerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--only", nargs="*", default=None, help="names of the variants to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    on_gpu = device.type == "cuda"

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    batch = packed_batch(vocab, args.capacity).to(device)
    results = {}

    def run(name, make, backend, grad, autocast=False):
        if args.only and name not in args.only:
            return
        if backend == "flex" and grad and not on_gpu:
            return
        model = make(backend)
        masks = build_attention_masks(model, batch, backend)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), ctx:
            out = compute_logps(model, batch, masks)
            if grad:
                out.sums.sum().backward()
        results[name] = out.token_logps.detach().float().cpu()
        del model, out
        if on_gpu:
            torch.cuda.empty_cache()

    bf16, fp32 = torch.bfloat16, torch.float32
    plain = lambda dtype: lambda backend: load(args.model, device, dtype, backend)  # noqa: E731

    def frozen(backend):
        return shard_frozen(load(args.model, device, bf16, backend), device)

    def sharded(mixed, dtype):
        return lambda backend: fully_shard_policy(load(args.model, device, dtype, backend), device, mixed)

    accelerators = []

    def prepared(backend):
        policy, accelerator = accelerate_policy(load(args.model, device, fp32, backend), device)
        accelerators.append(accelerator)
        return policy

    run("plain-flex", plain(bf16), "flex", grad=False)  # the baseline
    run("plain-sdpa", plain(bf16), "sdpa", grad=False)
    run("plain-flex-grad", plain(bf16), "flex", grad=True)
    run("plain-sdpa-grad", plain(bf16), "sdpa", grad=True)
    run("master-autocast-flex-grad", plain(fp32), "flex", grad=True, autocast=True)
    run("master-autocast-sdpa-grad", plain(fp32), "sdpa", grad=True, autocast=True)
    run("frozen-shard-flex", frozen, "flex", grad=False)  # the trainer's sharded reference
    run("frozen-shard-sdpa", frozen, "sdpa", grad=False)
    run("shard-bf16-flex-grad", sharded(False, bf16), "flex", grad=True)
    run("shard-mp-flex", sharded(True, fp32), "flex", grad=False)
    run("shard-mp-flex-grad", sharded(True, fp32), "flex", grad=True)
    run("shard-mp-sdpa-grad", sharded(True, fp32), "sdpa", grad=True)
    run("shard-mp-autocast-flex-grad", sharded(True, fp32), "flex", grad=True, autocast=True)
    run("accelerate-flex", prepared, "flex", grad=False)
    run("accelerate-flex-grad", prepared, "flex", grad=True)
    run("accelerate-sdpa-grad", prepared, "sdpa", grad=True)

    base = results.get("plain-flex", next(iter(results.values())))
    summary = {}
    for name, logps in results.items():
        diff = (logps - base).abs()
        summary[name] = {"mean_logp": round(logps.mean().item(), 4), "max_diff": round(diff.max().item(), 4),
                         "mean_diff": round(diff.mean().item(), 5),
                         "sum_rel_diff": round(abs(logps.sum().item() - base.sum().item()) / abs(base.sum().item()), 5)}
        print(f"{name:30s} {json.dumps(summary[name])}", flush=True)
    print(json.dumps({"probe": summary, "tokens": int(base.numel()), "device": str(device),
                      "torch": torch.__version__}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
