"""One data-parallel rank of tests/test_distributed.py (gloo on CPU); run as a script."""

import argparse
import os

import torch
import torch.distributed as dist
from conftest import tiny_model
from test_step import make_groups

from prefixpo.layout import build_batch, layout_group
from prefixpo.losses import get_loss
from prefixpo.modeling import apply_prefix_attention
from prefixpo.packing import pack, split_rows_over_ranks
from prefixpo.step import preference_step, reference_from_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world_size)
    policy, reference = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    apply_prefix_attention(policy, "sdpa")
    apply_prefix_attention(reference, "sdpa")
    layouts = [layout_group(g) for g in make_groups()]
    lengths = [len(lay) for lay in layouts]
    rows = pack(lengths, 256, seed=0, window=4)
    mine = split_rows_over_ranks(rows, lengths, args.world_size, seed=0)[args.rank]
    micro_batches = [build_batch([[layouts[i] for i in row]], row_length=256) for row in mine]
    result = preference_step(policy, micro_batches, get_loss("sigmoid", beta=0.1),
                             reference=reference_from_model(reference), chunk_size=32)
    loss = torch.tensor(result.loss)
    if args.world_size > 1:  # what DDP does: average gradients; the loss shares add up
        for p in policy.parameters():
            dist.all_reduce(p.grad)
            p.grad /= args.world_size
        dist.all_reduce(loss)
    if args.rank == 0:
        torch.save({"loss": loss.item(), "rows": len(mine), "count": result.count,
                    "grads": {n: p.grad for n, p in policy.named_parameters()}}, args.out)
    if args.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
