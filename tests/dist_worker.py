"""One data-parallel rank of tests/test_distributed.py (gloo on CPU); run as a script.

Without ``--fsdp``: the gradient all-reduce DDP does, by hand. With ``--fsdp``: the policy is
sharded by accelerate's own FSDP2 preparation (what ``Accelerator.prepare`` runs under
``distributed_type: FSDP``, which accelerate does not offer on CPU), the frozen reference by
``shard_frozen``, and the optimizer state goes through a sharded checkpoint and back. One process
(``--world-size 1``) is the plain, unsharded oracle.
"""

import argparse
import os
import sys
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from test_step import make_groups
from transformers import AutoConfig, AutoModelForCausalLM

from prefixpo.layout import build_batch, layout_group
from prefixpo.losses import get_loss
from prefixpo.modeling import ScoredLM, apply_prefix_attention, build_attention_masks
from prefixpo.packing import pack, split_rows_over_ranks
from prefixpo.reference import reference_from_model
from prefixpo.step import preference_step

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny-llama.json"


def tiny_tied_llama(seed: int) -> torch.nn.Module:
    """The tiny Llama with tied input and output embeddings (as llama-1b has)."""
    config = AutoConfig.from_pretrained(CONFIG, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return apply_prefix_attention(model, "sdpa")


def shard_like_accelerate(policy: ScoredLM, rank: int) -> ScoredLM:
    """accelerate's FSDP2 preparation of the policy, with the plugin of examples/accelerate/fsdp2.yaml."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_ram_efficient_loading=True,
                                            state_dict_type="SHARDED_STATE_DICT")
    plugin.set_auto_wrap_policy(policy)
    stand_in = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                     is_main_process=rank == 0, mixed_precision="no", torch_device_mesh=None,
                                     parallelism_config=None)
    return fsdp2_prepare_model(stand_in, policy)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--checkpoint", help="FSDP: directory for the sharded optimizer state")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world_size)
    sharded = args.fsdp and args.world_size > 1
    model, reference = tiny_tied_llama(seed=0), tiny_tied_llama(seed=1)
    layouts = [layout_group(g) for g in make_groups()]
    lengths = [len(lay) for lay in layouts]
    rows = pack(lengths, 256, seed=0, window=8)  # 3 rows: on 2 ranks, one rank gets an empty row
    mine = split_rows_over_ranks(rows, lengths, args.world_size, seed=0)[args.rank]
    micro_batches = [build_batch([[layouts[i] for i in row]], row_length=256) for row in mine]
    policy = ScoredLM(model)
    ref_fn, masks = reference_from_model(reference), None
    no_sync = None
    if sharded:
        from prefixpo.engine.fsdp import apply_fsdp_hints, shard_frozen
        from prefixpo.modeling import tied_embeddings
        from prefixpo.reference import collective, reference_for_step

        policy = shard_like_accelerate(apply_fsdp_hints(policy), args.rank)
        assert tied_embeddings(policy.model), "tied embeddings came out of FSDP preparation as two parameters"
        assert all(hasattr(layer, "unshard") for layer in policy.model.model.layers), "layers not sharded one by one"
        ref_fn, masks = reference_for_step(collective(reference_from_model(shard_frozen(reference,
                                                                                        torch.device("cpu")))),
                                           micro_batches, lambda mb: build_attention_masks(model, mb))

        @contextmanager
        def skip_reduce():  # accelerator.no_sync under FSDP2
            policy.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                policy.set_requires_gradient_sync(True)

        no_sync = lambda last: nullcontext() if last else skip_reduce()  # noqa: E731
    result = preference_step(policy, micro_batches, get_loss("sigmoid", beta=0.1), reference=ref_fn, chunk_size=32,
                             no_sync=no_sync, masks=masks)
    loss = torch.tensor(result.loss)
    if args.world_size > 1:
        if not args.fsdp:  # what DDP does: average gradients
            for p in policy.parameters():
                dist.all_reduce(p.grad)
                p.grad /= args.world_size
        dist.all_reduce(loss)  # the loss shares add up
    grads = {n.removeprefix("model."): full(p.grad).clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = {}
    if sharded:  # the gathered model as the trainer saves it, then the sharded optimizer state round trip
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from prefixpo.checkpoint import load_sharded_state, save_model, save_sharded_state

        # what Accelerator.get_state_dict does under FSDP2
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        gathered = {k.removeprefix("model."): v for k, v in get_model_state_dict(policy, options=options).items()}
        weights = {n.removeprefix("model."): full(p).detach().clone() for n, p in policy.named_parameters()}
        directory = Path(args.checkpoint)
        if args.rank == 0:
            save_model(policy.model, None, directory.with_name("model"), state_dict=gathered)
            directory.mkdir(parents=True)
        dist.barrier()
        save_sharded_state(policy, optimizer, directory)
        saved_draw = torch.rand(3)  # the RNG state was saved before this draw
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        load_sharded_state(policy, optimizer, directory)
        assert torch.equal(torch.rand(3), saved_draw), "the RNG state was not restored"
    names = {p: n.removeprefix("model.") for n, p in policy.named_parameters()}
    moments = {names[p]: full(s["exp_avg_sq"]).clone() for p, s in optimizer.state.items()}
    if args.rank == 0:
        torch.save({"loss": loss.item(), "rows": len(mine), "count": result.count, "grads": grads,
                    "exp_avg_sq": moments, "weights": weights}, args.out)
    if args.world_size > 1:
        dist.barrier()  # both ranks are done with every collective
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # the results are written; skip interpreter teardown, where gloo's threads occasionally abort
    # the process ("terminate called without an active exception", about 1 run in 20)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
