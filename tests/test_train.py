"""The trainer: resume after SIGKILL, checkpoints, reference modes, failures, config errors."""

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from test_distributed import free_port

from prefixpo.cli import main

QUICK = ROOT / "examples" / "quickstart"


def write_config(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "model_name_or_path": str(QUICK / "model" / "config.json"), "tokenizer_name_or_path": str(QUICK / "tokenizer"),
        "output_dir": str(tmp_path / "run"), "seed": 0, "max_length": 128, "logging_steps": 1,
        "disable_progress_bar": True, "stage": "preference", "dataset": str(QUICK / "data" / "pref_train.jsonl"),
        "max_samples": 160, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "max_steps": 40, "save_steps": 4, "save_total_limit": 3,
        "reference_mode": "model",
    }
    cfg.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timeless(path: Path) -> list[dict]:
    drop = {"pairs_per_s", "tokens_per_s", "step_time_s", "slowest_rank_idle", "elapsed_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(["train", "--config", str(write_config(whole))]) == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    config = write_config(killed)
    cmd = [sys.executable, "-m", "prefixpo.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = killed / "run"
    deadline = time.time() + 120
    while not (run / "checkpoint-8" / "training_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()  # really killed mid-run
    assert main(["train", "--config", str(config), "--resume_from_checkpoint", "latest"]) == 0

    assert timeless(run / "metrics.jsonl") == timeless(whole / "run" / "metrics.jsonl")
    a, b = final_weights(run), final_weights(whole / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(run.glob("checkpoint-*"))) == 3  # save_total_limit


def test_checkpoints_load_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["train", "--config", str(write_config(tmp_path, max_steps=4, save_steps=2))]) == 0
    for directory in ("checkpoint-4", "final"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / directory)
        assert model.config.model_type == "llama"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["prefix_sharing"] is True


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import prefixpo.trainer

    real = prefixpo.trainer.get_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        fn = real(*args, **kwargs)

        def loss_fn(*a):
            losses, metrics = fn(*a)
            calls["n"] += 1
            return (losses * float("nan") if calls["n"] > 6 else losses), metrics
        return loss_fn

    monkeypatch.setattr(prefixpo.trainer, "get_loss", poisoned)
    assert main(["train", "--config", str(write_config(tmp_path, save_steps=2))]) == 1
    err = capsys.readouterr().err
    assert "the loss is nan at step 4" in err and "checkpoint-2" in err
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_step_saves_that_whole_step_and_resumes_exactly(tmp_path, monkeypatch, capsys, signum, code):
    """Ctrl-C or SIGTERM (SLURM, Kubernetes) while a step runs: the step finishes (optimizer step
    included), is checkpointed, and the run exits 128 + the signal; resumed, it ends as an
    uninterrupted run does, in metrics and bit-identical weights."""
    import prefixpo.trainer

    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(["train", "--config", str(write_config(whole, max_steps=8, save_steps=100))]) == 0

    real = prefixpo.trainer.preference_step
    calls = {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of step 4: before its forward and backward
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefixpo.trainer, "preference_step", signalled)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    config = str(write_config(stopped, max_steps=8, save_steps=100))
    capsys.readouterr()
    assert main(["train", "--config", config]) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"prefixpo train: stopped by {signal.Signals(signum).name}: saved") and "at step 4" in err
    assert [p.name for p in (stopped / "run").glob("checkpoint-*")] == ["checkpoint-4"]
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers put back
    monkeypatch.setattr(prefixpo.trainer, "preference_step", real)
    assert main(["train", "--config", config, "--resume_from_checkpoint", "latest"]) == 0
    assert timeless(stopped / "run" / "metrics.jsonl") == timeless(whole / "run" / "metrics.jsonl")
    a, b = final_weights(stopped / "run"), final_weights(whole / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    (["--learning_rat", "1e-3"], "did you mean `learning_rate`"),
    (["--lr_scheduler_type", "wavy"], "`lr_scheduler_type`"),
    (["--loss_type", "nonsense"], "`loss_type`"),
    (["--packing", "true", "--packing_capacity", "100"], "`packing_capacity`"),
    (["--beta", "[0.1]"], "config key `beta`: must be a number, got [0.1]"),
    (["--beta", "-1"], "config key `beta`: loss 'sigmoid': parameter beta=-1.0 is not allowed; it must be > 0"),
])
def test_config_mistakes_name_the_key(tmp_path, capsys, override, message):
    assert main(["train", "--config", str(write_config(tmp_path)), *override]) == 2
    assert message in capsys.readouterr().err


def test_precomputed_reference_gives_the_live_reference_loss(tmp_path):
    from prefixpo.layout import Group, build_batch, layout_group
    from prefixpo.losses import get_loss
    from prefixpo.modeling import apply_prefix_attention, load_model
    from prefixpo.reference import precompute_reference, reference_from_cache, reference_from_model
    from prefixpo.step import preference_step

    policy = load_model(str(ROOT / "examples/configs/tiny-llama.json"), seed=0, attn_implementation="eager")
    reference = load_model(str(ROOT / "examples/configs/tiny-llama.json"), seed=1, attn_implementation="eager")
    for m in (policy, reference):
        apply_prefix_attention(m, "sdpa")
    gen = torch.Generator().manual_seed(0)
    groups = [Group(torch.randint(0, 512, (int(n),), generator=gen).tolist(),
                    [torch.randint(0, 512, (k,), generator=gen).tolist() for k in (5, 9)])
              for n in torch.randint(1, 40, (6,), generator=gen)]
    rows = [[0, 3], [1], [2, 4, 5]]
    batches = [build_batch([[layout_group(groups[i]) for i in row]], group_ids=[row]) for row in rows]
    cached = reference_from_cache(precompute_reference(reference, groups, tmp_path / "ref.pt", batch_size=4))
    assert (tmp_path / "ref.pt").is_file()
    results = []
    for ref in (reference_from_model(reference), cached):
        policy.zero_grad()
        r = preference_step(policy, batches, get_loss("sigmoid", beta=0.1), reference=ref)
        results.append((r.loss, [p.grad.clone() for p in policy.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(results[0][1], results[1][1]))


def test_lora_reference_with_adapters_disabled_is_the_base_model():
    peft = pytest.importorskip("peft")
    from prefixpo.layout import Group, collate_groups
    from prefixpo.modeling import apply_prefix_attention, compute_logps, load_model
    from prefixpo.reference import reference_from_adapters_off

    base = load_model(str(ROOT / "examples/configs/tiny-qwen2.json"), seed=0, attn_implementation="eager")
    apply_prefix_attention(base, "sdpa")
    batch = collate_groups([Group([1, 2, 3, 4], [[5, 6, 7], [8, 9]]), Group([10], [[11, 12, 13, 14], [15]])])
    with torch.no_grad():
        want = compute_logps(base, batch).sums
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    with torch.no_grad():
        adapted = compute_logps(lora, batch).sums
    got = reference_from_adapters_off(lora)(batch, None).sums
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (adapted - want).abs().max() > 1e-2


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    from prefixpo.config import load_stages

    assert load_stages(path)


def test_stage_overrides_and_chaining(tmp_path):
    from prefixpo.config import load_stages

    sft, pref = load_stages(ROOT / "examples" / "quickstart.yaml",
                            ["--output_dir", str(tmp_path), "--preference.beta", "0.3", "--seed", "7"])
    assert (sft.seed, pref.seed, sft.beta, pref.beta) == (7, 7, 0.1, 0.3)
    assert pref.model_name_or_path == str(tmp_path / "0-sft" / "final")


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from prefixpo.config import ConfigError, load_stages

    (cfg,) = load_stages(write_config(tmp_path), ["--learning_rate", "1e-5", "--beta", "1"])
    assert cfg.learning_rate == 1e-5 and cfg.beta == 1.0
    with pytest.raises(ConfigError, match="`learning_rate`: expected a number"):
        load_stages(write_config(tmp_path), ["--learning_rate", "fast"])


@pytest.mark.parametrize("overrides", [
    ["--use_peft", "true", "--lora_r", "4", "--learning_rate", "1e-2"],
    ["--reference_mode", "precomputed", "--packing", "true", "--packing_capacity", "256"],
    ["--gradient_checkpointing", "true", "--prefix_sharing", "false", "--generate_during_eval", "true",
     "--num_generations", "2", "--max_new_tokens", "4"],
    ["--loss_type", "[sigmoid, sft]", "--loss_weights", "[1.0, 0.5]", "--packing", "true", "--packing_capacity", "256"],
    ["--loss_type", "simpo"],
], ids=["lora", "precomputed-packed", "ckpt-unshared-generate", "combined-loss", "reference-free"])
def test_training_modes_run_end_to_end(tmp_path, overrides, monkeypatch):
    monkeypatch.setenv("PREFIXPO_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, max_steps=4, save_steps=None, eval_steps=2, reference_mode="auto",
                          eval_dataset=str(QUICK / "data" / "pref_eval.jsonl"))
    assert main(["train", "--config", str(config), *overrides]) == 0
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in lines)
    assert (run / "final").is_dir()
    done = json.loads((run / "training_done.json").read_text())
    if "--use_peft" in overrides:
        assert done["reference"] == "adapters_off" and (run / "final" / "adapter_config.json").is_file()
        from safetensors.torch import load_file

        adapters = load_file(run / "final" / "adapter_model.safetensors")
        lora_b = [t for k, t in adapters.items() if "lora_B" in k]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # trained adapters were saved
    if "precomputed" in overrides:
        assert done["reference"] == "precomputed" and list((tmp_path / "cache" / "reference").glob("*.pt"))
        assert not list((tmp_path / "cache" / "reference").glob("*.tmp*"))  # written aside, renamed, none left
    if "simpo" in overrides:
        assert done["reference"] == "none"
    if "--generate_during_eval" in overrides:
        samples = (run / "samples" / "step-2.jsonl").read_text().splitlines()
        assert len(samples) == 2 and all(json.loads(s)["policy"] and json.loads(s)["reference"] for s in samples)


def test_report_to_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    config = write_config(tmp_path, max_steps=2, save_steps=None, report_to="tensorboard")
    assert main(["train", "--config", str(config)]) == 0
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_qlora_needs_peft_and_bitsandbytes(tmp_path, capsys):
    import importlib.util

    assert main(["train", "--config", str(write_config(tmp_path)), "--load_in_4bit", "true"]) == 2
    assert "set use_peft: true" in capsys.readouterr().err
    if importlib.util.find_spec("bitsandbytes") is None:
        assert main(["train", "--config", str(write_config(tmp_path)), "--load_in_4bit", "true",
                     "--use_peft", "true"]) == 2
        assert "bitsandbytes" in capsys.readouterr().err


def two_process_config(directory: Path) -> Path:
    """47 rows: one rank gets an empty eval row, so the eval is gathered over uneven ranks."""
    return write_config(directory, max_samples=47, max_steps=4, save_steps=2, torch_num_threads=1,
                        gradient_accumulation_steps=1, eval_dataset=str(QUICK / "data" / "pref_eval.jsonl"),
                        eval_steps=2)


def launch_two(*args: str) -> None:
    """Two CPU ranks (gloo) under torchrun: `accelerate launch --cpu` starts one process without
    mpirun; accelerate reads the ranks from torchrun's environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """One process with gradient_accumulation_steps 2: the global batch of 2 ranks x 1."""
    directory = tmp_path_factory.mktemp("one")
    assert main(["train", "--config", str(two_process_config(directory)), "--gradient_accumulation_steps", "2"]) == 0
    return directory / "run"


def assert_same_losses(one: list[dict], two: list[dict]) -> None:
    """The same lines, train and eval losses and reward margins equal up to float rounding."""
    assert [(r["split"], r["step"]) for r in two] == [(r["split"], r["step"]) for r in one]
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "logps/chosen"):  # (accuracy: a margin near 0 may flip)
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["split"], a["step"], key)
        if a["split"] == "train":
            assert len(b["rank_tokens"]) == 2 and sum(b["rank_tokens"]) == a["rank_tokens"][0]
            assert b["pairs"] == a["pairs"]
            assert 0 <= b["rank_token_imbalance"] < 0.5 and 0 <= b["slowest_rank_idle"] < 1


def assert_close_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    w1, w2 = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4 * float(w1[k].abs().max()), msg=k)


def test_two_processes_log_the_losses_of_one_process_with_the_same_global_batch(one_process, tmp_path):
    """DDP on 2 CPU processes with gradient_accumulation_steps 1 against 1 process with 2: every
    step trains the same pairs, so the logged train and eval losses match, and the final weights
    match up to float rounding."""
    from transformers import AutoModelForCausalLM

    launch_two("-m", "prefixpo.cli", "train", "--config", str(two_process_config(tmp_path)))
    two = records(tmp_path / "run")  # one writer: no duplicated lines
    assert [(r["split"], r["step"]) for r in two] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert_same_losses(records(one_process), two)
    assert_close_weights(one_process / "final", tmp_path / "run" / "final")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None


def test_two_processes_share_the_precomputed_reference_and_its_cache(one_process, tmp_path, monkeypatch):
    """``reference_mode: precomputed`` under DDP on 2 CPU ranks: each rank computes every second
    group's reference log-probs and the shares are gathered, so the run logs the losses of one
    process with a live reference (in fp32 the two are the same numbers). The cache holds every
    train and eval group once; a second run reads it (both ranks agree it is there) and logs the
    same losses without rewriting it."""
    monkeypatch.setenv("PREFIXPO_CACHE", str(tmp_path / "cache"))
    config = two_process_config(tmp_path)
    launch_two("-m", "prefixpo.cli", "train", "--config", str(config), "--reference_mode", "precomputed")
    first = records(tmp_path / "run")
    assert_same_losses(records(one_process), first)
    caches = sorted((tmp_path / "cache" / "reference").iterdir())
    stored = sorted(len(torch.load(path, weights_only=True)) for path in caches)
    assert stored == [47, 47]  # train and eval (max_samples caps both): every group once, no temporary file
    assert all(t.numel() >= 2 for path in caches for t in torch.load(path, weights_only=True))
    written = [path.stat().st_mtime_ns for path in caches]
    launch_two("-m", "prefixpo.cli", "train", "--config", str(config), "--reference_mode", "precomputed",
               "--output_dir", str(tmp_path / "again"))
    assert [(r["split"], r["step"], r["loss"]) for r in records(tmp_path / "again")] == \
        [(r["split"], r["step"], r["loss"]) for r in first]
    assert sorted((tmp_path / "cache" / "reference").iterdir()) == caches
    assert [path.stat().st_mtime_ns for path in caches] == written


PRECOMPUTE_PROBE = """
import json, sys
import torch
from accelerate import Accelerator
from prefixpo.modeling import apply_prefix_attention, decoder_of, load_model
from prefixpo.oracle import random_groups
from prefixpo.reference import precompute_reference

accelerator = Accelerator(cpu=True)
model = apply_prefix_attention(load_model(sys.argv[1], seed=0).eval(), "sdpa")
seen = []
decoder_of(model).register_forward_hook(lambda module, args, kwargs, out: seen.append(len(kwargs["input_ids"])),
                                       with_kwargs=True)
count = 11 + (accelerator.process_index if sys.argv[4:] == ["mismatch"] else 0)
groups = random_groups(model.config.vocab_size, count, 2, 0, max_prompt=20, max_response=10)
try:
    sums = precompute_reference(model, groups, __import__("pathlib").Path(sys.argv[2]), batch_size=2,
                                accelerator=accelerator)
    result = {"rows": sum(seen), "sums": [t.tolist() for t in sums]}
except Exception as error:
    result = {"error": f"{type(error).__name__}: {error}"}
json.dump(result, open(f"{sys.argv[3]}-{accelerator.process_index}.json", "w"))
"""


def test_each_process_precomputes_a_share_of_the_reference(tmp_path):
    """``precompute_reference`` on 2 ranks: each runs the reference on its share of the groups
    (6 and 5 of 11; no rank on all of them) and both return every group's sums, those of one
    process computing all; one cache file, none left over. Run again, both ranks read the cache.
    Ranks holding different groups stop, all of them, before computing anything."""
    from prefixpo.modeling import apply_prefix_attention, load_model
    from prefixpo.oracle import random_groups
    from prefixpo.reference import reference_sums

    probe = tmp_path / "probe.py"
    probe.write_text(PRECOMPUTE_PROBE)
    config, cache = str(QUICK / "model" / "config.json"), tmp_path / "cache" / "ref.pt"
    launch_two(str(probe), config, str(cache), str(tmp_path / "first"))
    model = apply_prefix_attention(load_model(config, seed=0).eval(), "sdpa")
    groups = random_groups(model.config.vocab_size, 11, 2, 0, max_prompt=20, max_response=10)
    alone = [t.tolist() for t in reference_sums(model, groups, range(11), batch_size=2)]
    first = [json.loads((tmp_path / f"first-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in first] == [6, 5]
    for result in first:
        assert len(result["sums"]) == 11
        for got, want in zip(result["sums"], alone):
            assert got == pytest.approx(want, rel=1e-5)
    assert [p.name for p in cache.parent.iterdir()] == ["ref.pt"]
    launch_two(str(probe), config, str(cache), str(tmp_path / "again"))
    again = [json.loads((tmp_path / f"again-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in again] == [0, 0] and [r["sums"] for r in again] == [r["sums"] for r in first]
    cache.unlink()
    launch_two(str(probe), config, str(cache), str(tmp_path / "mismatch"), "mismatch")  # 11 groups and 12
    for rank in (0, 1):
        error = json.loads((tmp_path / f"mismatch-{rank}.json").read_text())["error"]
        assert error.startswith("TrainingError: the processes hold different data for the precomputed reference")
        assert "group counts [11, 12]" in error
    assert not cache.exists()


def test_fsdp2_on_two_processes_matches_one_and_resumes_from_sharded_state(one_process, tmp_path):
    """The trainer's FSDP2 path on 2 CPU ranks (tests/fsdp_cpu.py turns accelerate's FSDP2 state
    on, which accelerate offers on GPUs only): the losses of one process with the same global
    batch; checkpoints with the gathered model (tied alias dropped) and per-rank optimizer shards;
    a run resumed from checkpoint-2 logs the uninterrupted run's later losses and ends with its
    weights."""
    harness = str(Path(__file__).with_name("fsdp_cpu.py"))
    config = two_process_config(tmp_path)
    launch_two(harness, "train", "--config", str(config))
    run = tmp_path / "run"
    whole = records(run)
    assert_same_losses(records(one_process), whole)
    assert_close_weights(one_process / "final", run / "final")
    checkpoint = run / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt"]
    assert "optimizer" not in torch.load(checkpoint / "training_state.pt", weights_only=True)
    launch_two(harness, "train", "--config", str(config), "--output_dir", str(tmp_path / "resumed"),
               "--resume_from_checkpoint", str(checkpoint))
    resumed = records(tmp_path / "resumed")
    assert [(r["split"], r["step"]) for r in resumed] == [("train", 3), ("train", 4), ("eval", 4)]
    later = [r for r in whole if r["step"] > 2]
    drop = {"pairs_per_s", "tokens_per_s", "step_time_s", "slowest_rank_idle", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in later]
    assert_close_weights(run / "final", tmp_path / "resumed" / "final")


def test_policy_and_reference_that_disagree_at_step_one_stop_the_run(tmp_path, monkeypatch):
    """A reference that computes something else than the policy (here: its log-probs shifted by
    20 nats per response, as a broken attention or sharding path would) stops the run at step 1
    with a message; the unchanged run of the other tests passes the same check."""
    import prefixpo.reference
    import prefixpo.trainer
    from prefixpo.guards import TrainingError
    from prefixpo.logprobs import ResponseLogps

    real = prefixpo.reference.build_reference

    def shifted(*args, **kwargs):
        train_ref, eval_ref, mode = real(*args, **kwargs)

        def broken(batch, masks):
            out = train_ref(batch, masks)
            return ResponseLogps(out.sums - 20.0, out.means, out.counts, out.token_logps)

        return broken, eval_ref, mode

    monkeypatch.setattr(prefixpo.trainer, "build_reference", shifted)
    with pytest.raises(TrainingError, match="disagree by"):
        prefixpo.trainer.train_stage(stage_config(write_config(tmp_path, max_steps=2)))


def stage_config(path: Path):
    from prefixpo.config import load_stages

    return load_stages(str(path))[0]


def test_a_non_finite_gradient_stops_before_the_step_and_nothing_non_finite_is_saved(tmp_path, monkeypatch, capsys):
    import prefixpo.trainer

    real = prefixpo.trainer.preference_step
    calls = {"n": 0}

    def poisoned(policy, *args, **kwargs):
        result = real(policy, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # a finite loss, one non-finite gradient entry
            next(p for p in policy.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(prefixpo.trainer, "preference_step", poisoned)
    assert main(["train", "--config", str(write_config(tmp_path, save_steps=2))]) == 1
    err = capsys.readouterr().err
    assert "the gradient norm is inf at step 5" in err and "checkpoint-4" in err
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "run" / "checkpoint-6").exists()


def test_an_exploding_loss_stops_the_run(tmp_path, capsys):
    """learning_rate 1e6 used to run to the end with exit 0 and weights of 4.5e6."""
    assert main(["train", "--config", str(write_config(tmp_path, learning_rate=1.0e6, save_steps=None))]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopping before the optimizer step" in err and "Lower learning_rate" in err
    assert not (tmp_path / "run" / "final").exists()


def newest_step(run: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")), default=0)


def test_kills_at_random_moments_resume_to_identical_weights(tmp_path):
    """Fault injection: a run saving every step is killed (SIGKILL, SIGTERM, SIGKILL) at random
    moments once it trains (inside saves too: they take most of each step here), and restarted with
    `--resume_from_checkpoint auto` after each kill; it ends with the uninterrupted run's metrics
    and bit-identical weights."""
    import random

    settings = {"max_steps": 120, "save_steps": 1, "save_total_limit": 2, "max_samples": 480}
    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(["train", "--config", str(write_config(whole, **settings))]) == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    cmd = [sys.executable, "-m", "prefixpo.cli", "train", "--config", str(write_config(killed, **settings)),
           "--resume_from_checkpoint", "auto"]
    run, rng, codes = killed / "run", random.Random(0), []
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = newest_step(run)
        deadline = time.time() + 120
        while newest_step(run) <= start:  # training again: a checkpoint newer than the one resumed
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signum)
        proc.wait(timeout=120)
        codes.append(proc.returncode)
        if proc.returncode == 143:
            assert "stopped by SIGTERM: saved" in proc.stderr.read()
    assert codes == [-signal.SIGKILL, 143, -signal.SIGKILL]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert timeless(run / "metrics.jsonl") == timeless(whole / "run" / "metrics.jsonl")
    a, b = final_weights(run), final_weights(whole / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_weights_only_from_a_config_file(tmp_path, capsys):
    """A model directory that lost its weights (or never had them) is refused, naming the config
    file to give for random weights; a config file trains from random weights."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(QUICK / "model" / "config.json", bare / "config.json")
    assert main(["train", "--config", str(write_config(tmp_path, model_name_or_path=str(bare)))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prefixpo train: config key `model_name_or_path`: {bare} holds no weights (no *.safetensors or "
                   f"*.bin file); for random weights drawn from `seed`, give its config file: {bare / 'config.json'}")


def test_bin_weights_load_without_running_code(tmp_path):
    """A model saved as pytorch_model.bin (no safetensors) trains, from exactly its weights."""
    from transformers import AutoModelForCausalLM

    from prefixpo.modeling import load_model

    model = load_model(str(QUICK / "model" / "config.json"), seed=3, attn_implementation="eager")
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert [p.name for p in (tmp_path / "bin").glob("*.bin")] and not list((tmp_path / "bin").glob("*.safetensors"))
    config = write_config(tmp_path, model_name_or_path=str(tmp_path / "bin"), max_steps=1, save_steps=None,
                          learning_rate=1e-12, lr_scheduler_type="constant")
    assert main(["train", "--config", str(config)]) == 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    for name, tensor in model.state_dict().items():  # lr 1e-12: the loaded weights, not random ones
        assert torch.allclose(trained[name], tensor, atol=1e-6), name


def test_packing_lays_out_the_same_batch_so_the_run_is_the_same(tmp_path):
    """A step trains TRL's batch (per_device_train_batch_size x gradient_accumulation_steps groups)
    whether or not its groups are packed into rows: packed and unpacked runs log the same losses,
    pairs and rewards at every step and end with the same weights (fp32, up to summation order)."""
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        out.mkdir()
        assert main(["train", "--config", str(write_config(out, max_steps=10, save_steps=None, packing=packing))]) == 0
        runs[packing] = out / "run"
    unpacked, packed = records(runs[False]), records(runs[True])
    assert [r["pairs"] for r in packed] == [r["pairs"] for r in unpacked] == [8] * 10
    for a, b in zip(unpacked, packed):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert_close_weights(runs[False] / "final", runs[True] / "final")


def varied_pairs(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Pairs of the quickstart's words with prompts of 2 to 120 words, so packed rows of a few
    groups fall into several row lengths."""
    rng = random.Random(seed)
    words = "gray cup gold owl hat bee key hen lamp goat".split()
    with path.open("w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 120)))
            f.write(json.dumps({"prompt": prompt, "chosen": "the word is owl .", "rejected": "the word is hat ."}) + "\n")
    return path


def record_compiles(monkeypatch) -> tuple[list, list, list]:
    """``(options, module class names, calls)`` of every ``Module.compile`` from here on: the
    inductor options asked for, what was compiled, and how often each compiled module was then called."""
    options, compiled, calls, compile_module = [], [], [], torch.nn.Module.compile

    def recorded(module, *args, **kwargs):
        options.append(kwargs.get("options"))
        compiled.append(type(module).__name__)
        compile_module(module, *args, **kwargs)
        inner, index = module._compiled_call_impl, len(calls)
        calls.append(0)

        def counted(*a, **k):
            calls[index] += 1
            return inner(*a, **k)

        module._compiled_call_impl = counted

    monkeypatch.setattr(torch.nn.Module, "compile", recorded)
    return options, compiled, calls


@pytest.mark.parametrize("dynamic, mode", [(True, "default"), (False, "default"), (True, "reduce-overhead")])
def test_compiled_layers_see_every_shape_before_step_1(tmp_path, capsys, monkeypatch, dynamic, mode):
    """With compiled layers every packed row length is compiled before step 1 (training step and
    evaluation alike): no graph is compiled after it (``recompiles`` 0 in every train record),
    while the rows of the run do come in several lengths. Each layer is one graph: nothing in it
    breaks the graph (transformers' output-capturing hooks did, three graphs a layer). The model
    comes from a directory, as pretrained models do (transformers loads it in evaluation mode).
    Layers compiled with a symbolic row length, or statically (a graph per length); in
    ``torch_compile_mode`` (reduce-overhead's CUDA graphs are not recorded on the CPU: the step
    marking runs, the graphs are the default's). Every layer is compiled with the mode's options
    and rounds low precision as the uncompiled layer does (``torch_compile_eager_numerics``)."""
    import torch._inductor
    from torch._dynamo.utils import counters

    options, compiled, calls = record_compiles(monkeypatch)
    marks = []  # CUDA graphs' step starts: every forward_backward in reduce-overhead, none otherwise
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    from prefixpo.modeling import load_model

    model_dir = tmp_path / "model"
    load_model(str(QUICK / "model" / "config.json"), seed=0).save_pretrained(model_dir)
    data = varied_pairs(tmp_path / "pairs.jsonl")
    config = write_config(tmp_path, model_name_or_path=str(model_dir), dataset=str(data), max_length=256,
                          max_samples=None, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                          max_steps=12, save_steps=None, torch_compile=True, packing=True, packing_num_buckets=3,
                          eval_dataset=str(data), eval_steps=6, torch_compile_dynamic=dynamic,
                          torch_compile_mode=mode)
    counters.clear()
    assert main(["train", "--config", str(config)]) == 0
    expected = {**torch._inductor.list_mode_options(mode, dynamic), "emulate_precision_casts": True}
    assert options and all(o == expected for o in options), options  # every layer, policy and reference
    layers = json.loads((QUICK / "model" / "config.json").read_text())["num_hidden_layers"]
    assert compiled == ["LlamaDecoderLayer"] * (2 * layers)
    assert all(n >= 12 for n in calls), calls  # the steps ran through every compiled module
    assert len(marks) >= 12 + 3 if mode == "reduce-overhead" else not marks  # 12 steps, 3 evaluations, warm-up
    assert not counters["graph_break"], dict(counters["graph_break"])
    err = capsys.readouterr().err
    lengths = json.loads(re.search(r"row lengths (\[[0-9, ]+\])", err).group(1))
    train = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert len(train) == 12 and [r["recompiles"] for r in train] == [0] * 12
    assert len({-(-r["rank_tokens"][0] // 128) for r in train}) >= 2  # rows of several lengths
    assert len(lengths) >= 2 and err.count("compiling: row length") == len(lengths) + 1


def test_rows_of_any_length_run_the_compiled_layers_without_a_recompile(tmp_path, capsys, monkeypatch):
    """``packing_num_buckets: 0`` (the default): packed rows are padded only to a multiple (8 on
    CPU), so the run meets many row lengths; the layers' one graph has a symbolic length, the
    warm-up runs a few lengths, and no graph is compiled after step 1."""
    import prefixpo.trainer

    padded, make_batch = [], prefixpo.trainer.make_batch

    def recorded(*args, **kwargs):
        batch = make_batch(*args, **kwargs)
        padded.append(batch.input_ids.shape[1])
        return batch

    monkeypatch.setattr(prefixpo.trainer, "make_batch", recorded)
    data = varied_pairs(tmp_path / "pairs.jsonl")
    config = write_config(tmp_path, dataset=str(data), max_length=256, max_samples=None,
                          per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=12,
                          save_steps=None, torch_compile=True, packing=True)
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    warmed = int(re.search(r"warm-up: (\d+) row lengths", err).group(1))
    assert "row lengths any multiple of 8" in err and warmed >= 2 and err.count("compiling: row length") == warmed + 1
    train = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert [r["recompiles"] for r in train] == [0] * 12
    steps = padded[warmed + 1:]  # after the warm-up's rows, the 12 steps' rows as padded
    assert len(steps) == 12 and all(n % 8 == 0 for n in steps)
    assert len(set(steps)) >= 6 and len(set(steps) - set(padded[:warmed + 1])) >= 4  # lengths the warm-up never ran

def test_a_rank_without_pairs_in_the_last_step_still_logs_with_the_others(tmp_path):
    """41 groups, 2 ranks x 4 groups per step: the epoch's last step holds one group, so one rank has
    no pair and no metric at all. The ranks agree on the metric keys before reducing them (unequal
    reductions would hang) and the step's record holds the one pair's metrics."""
    config = write_config(tmp_path, max_samples=41, max_steps=-1, num_train_epochs=1, save_steps=None,
                          torch_num_threads=1, gradient_accumulation_steps=1)
    launch_two("-m", "prefixpo.cli", "train", "--config", str(config))
    train = records(tmp_path / "run")
    assert [r["pairs"] for r in train] == [8.0] * 5 + [1.0]
    assert "rewards/margins" in train[-1] and train[-1]["rewards/accuracies"] in (0.0, 1.0)


def test_warm_up_with_a_precomputed_reference_and_ranked_groups(tmp_path):
    """The warm-up's filler rows are no group of the data: a precomputed reference (which knows only
    the data's groups, here of 3 ranked responses) gives them zeros instead of another group's sums."""
    rng = random.Random(1)
    words = "gray cup gold owl hat bee key hen lamp goat".split()
    data = tmp_path / "ranked.jsonl"
    with data.open("w") as f:
        for _ in range(24):
            responses = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + f" {k}" for k in range(3)]
            f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))),
                                "responses": responses, "scores": [3, 2, 1]}) + "\n")
    config = write_config(tmp_path, dataset=str(data), max_samples=None, max_steps=3, save_steps=None,
                          torch_compile=True, packing=True, reference_mode="precomputed")
    assert main(["train", "--config", str(config)]) == 0
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]


def test_the_step_profiler_script_profiles_a_running_train(tmp_path):
    """``scripts/gpu_profile_train.py`` (docs/benchmarks.md) hooks the trainer's ``forward_backward``
    to profile the steps it names of a real ``prefixpo train`` run (on CPU: host ops only), and
    says so in one line when the run ends before them."""
    config = write_config(tmp_path, max_steps=6, save_steps=None, max_samples=48)
    script = [sys.executable, str(ROOT / "scripts" / "gpu_profile_train.py"), "--config", str(config)]
    out = tmp_path / "prof"
    proc = subprocess.run([*script, "--steps", "2:4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [2, 4] and summary["wall_ms_per_step"] > 0 and summary["device"] == "cpu"
    assert "aten::" in (out / "top_host_ops.txt").read_text() and (out / "trace.json.gz").stat().st_size > 0
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]) == 6
    late = subprocess.run([*script, "--steps", "8:10", "--out", str(tmp_path / "late")], capture_output=True,
                          text=True, timeout=300)
    assert late.returncode != 0 and late.stderr.strip().splitlines()[-1] == \
        "the run ended (rc 0) before step 10: lower --steps"
    empty = subprocess.run([*script, "--steps", "3:3", "--out", str(tmp_path / "empty")], capture_output=True,
                           text=True, timeout=300)
    assert empty.returncode != 0 and empty.stderr.strip() == "--steps takes first:last with 1 <= first < last, got 3:3"


def test_a_compile_mode_without_compiled_layers_says_it_has_no_effect(tmp_path, capsys):
    config = write_config(tmp_path, max_steps=1, save_steps=None, torch_compile=False,
                          torch_compile_mode="reduce-overhead", torch_compile_eager_numerics=False)
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "note: torch_compile_mode reduce-overhead has no effect: the layers are not compiled" in err
    assert "note: torch_compile_eager_numerics false has no effect: the layers are not compiled" in err


@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_learning_rate_schedules_are_transformers(name, warmup):
    """prefixpo's schedules (written out, to keep transformers.optimization out of the start-up)
    give transformers' ``get_scheduler`` learning rates at every step, the end included."""
    from transformers import get_scheduler

    from prefixpo.trainer import lr_schedule

    rates = []
    for make in (lambda opt: lr_schedule(name, opt, warmup, 10),
                 lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=10)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        schedule, seen = make(opt), []
        for _ in range(12):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        rates.append(seen)
    assert rates[0] == pytest.approx(rates[1], abs=1e-15)
    assert len(set(rates[0])) > 1 or name == "constant" or (name, warmup) == ("constant_with_warmup", 0)
