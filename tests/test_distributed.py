"""Two data-parallel processes (gloo, CPU) give the loss and gradients of one process with the same
global batch: by hand (DDP's all-reduce) and sharded (FSDP2), plus the sharded checkpoint."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(out: Path, *extra: str) -> dict:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world-size", "2",
                               "--port", str(port), "--out", str(out), *extra]) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(WORKER), "--out", str(out)], check=True, timeout=300)
    return torch.load(out, weights_only=True)


def assert_same_step(one: dict, two: dict) -> None:
    assert one["count"] == two["count"] == 10  # the pair count is summed across ranks
    assert two["rows"] < one["rows"]
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        rel = (two["grads"][name] - g).abs().max() / g.abs().max()
        assert rel <= 1e-5, f"{name}: {rel:.2e}"


def test_two_processes_equal_one(single, tmp_path):
    assert_same_step(single, run_two(tmp_path / "dual.pt"))


def test_fsdp2_two_processes_equal_one_and_the_sharded_optimizer_state_round_trips(single, tmp_path):
    """FSDP2 on 2 ranks, one of which gets an empty row (the sharded reference must still run
    there): the same loss and gradients; Adam's second moments after one step, saved sharded and
    loaded into a fresh optimizer, equal the single process's; the model gathered from the shards
    and saved loads with from_pretrained and holds the shards' weights."""
    from transformers import AutoModelForCausalLM

    two = run_two(tmp_path / "fsdp.pt", "--fsdp", "--checkpoint", str(tmp_path / "sharded"))
    assert_same_step(single, two)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert two["weights"].keys() <= loaded.keys() and len(two["weights"]) > 10
    assert all(torch.equal(loaded[k], w) for k, w in two["weights"].items())
    assert torch.equal(loaded["lm_head.weight"], two["weights"]["model.embed_tokens.weight"])  # tied
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt"]
    assert single["exp_avg_sq"].keys() == two["exp_avg_sq"].keys()
    for name, v in single["exp_avg_sq"].items():
        torch.testing.assert_close(two["exp_avg_sq"][name], v, rtol=2e-5, atol=1e-12, msg=name)


def test_the_fsdp2_accelerate_config_launches_ranks_with_an_fsdp2_plugin(tmp_path):
    """examples/accelerate/fsdp2.yaml under `accelerate launch --num_processes 2` (overriding the
    file's 8): two ranks, each parsing it into accelerate's FSDP2 plugin. (accelerate runs FSDP
    only on GPUs; on CPU this checks the config and the launch.)"""
    import json

    root = WORKER.parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os\n"
        "from accelerate.utils import FullyShardedDataParallelPlugin\n"
        "p = FullyShardedDataParallelPlugin()\n"
        "print(json.dumps({'rank': os.environ['RANK'], 'world': os.environ['WORLD_SIZE'], 'version': p.fsdp_version,\n"
        "    'reshard': p.reshard_after_forward, 'wrap': p.auto_wrap_policy.__name__, 'state': p.state_dict_type.name,\n"
        "    'ram_efficient': p.cpu_ram_efficient_loading, 'ac': p.activation_checkpointing}))\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(probe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in seen] == [("0", "2"), ("1", "2")]
    assert all(r["version"] == 2 and r["reshard"] is True and r["wrap"] == "transformer_auto_wrap_policy"
               and r["state"] == "SHARDED_STATE_DICT" and r["ram_efficient"] is False for r in seen)


def test_fsdp2_bf16_policy_keeps_scored_logprobs_and_gradient_reduction_in_fp32(tmp_path):
    """accelerate's bf16 FSDP2 policy casts the wrapped module's outputs, the ScoredLM's token
    log-probs, to bf16 and reduces gradients in bf16; ``keep_fp32_outputs`` keeps bf16 compute
    and makes both fp32. Checked on the policy object and on a sharded ScoredLM in a world of 1,
    whose log-probs are then those of the given policy before its bf16 cast."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from dist_worker import tiny_tied_llama
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefixpo.engine.fsdp import keep_fp32_outputs
    from prefixpo.layout import Group, collate_groups
    from prefixpo.modeling import ScoredLM, compute_logps

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what accelerate's state does for mixed_precision: bf16
    given = plugin.mixed_precision_policy
    assert (given.output_dtype, given.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    keep_fp32_outputs(plugin)
    kept = plugin.mixed_precision_policy
    assert (kept.param_dtype, kept.reduce_dtype, kept.output_dtype) == (torch.bfloat16, torch.float32, None)

    batch = collate_groups([Group([5, 6, 7], [[8, 9, 10, 11], [12, 13]])])
    bf16 = tiny_tied_llama(seed=0).to(torch.bfloat16)
    with torch.no_grad():
        expected = compute_logps(bf16, batch).token_logps
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        got = {}
        for name, policy in (("given", given), ("kept", kept)):
            scored = ScoredLM(tiny_tied_llama(seed=0))
            for layer in scored.model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(scored, mesh=mesh, mp_policy=policy)
            got[name] = compute_logps(scored, batch).token_logps
    finally:
        dist.destroy_process_group()
    kept_logps, given_logps = got["kept"].detach(), got["given"].detach()
    assert torch.equal(given_logps, kept_logps.bfloat16().float())  # the same numbers, cast by the wrapper
    assert not torch.equal(kept_logps, given_logps)
    torch.testing.assert_close(kept_logps, expected, rtol=2e-2, atol=0)  # bf16 compute either way
