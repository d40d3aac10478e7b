"""Head-to-head: TRL's ``DPOTrainer`` against ``prefixpo train`` on the same pairs, model and weights.

What it measures, per length profile (``prefixpo/bench/profiles.json``) and per trainer setting:

- **steady pairs/s**: the median over the steps after ``--warmup-steps`` of pairs / step time
  (``mean_pairs_per_s_after_warmup`` in the JSON: all those steps' pairs over all their time,
  compilations of new shapes included);
- **first step s**: from launching the trainer's process to its first finished optimizer step
  (imports, data preparation, model loading and the first step's compilation included);
- **wall s**: from launch to the end of the process, for ``--pairs`` pairs (``--epochs`` passes),
  the final model saved by both (TRL's ``save_model``, prefixpo's ``final/``);
- **peak GiB**: ``torch.cuda.max_memory_allocated`` (TRL), ``max_memory_gib`` of prefixpo's
  ``metrics.jsonl``;
- **MFU**: where prefixpo's train records carry an ``mfu`` field (TRL's is not computed);
- **slowest/median**: the slowest step after step 1 over the median step time after step 1;
- **recompiles**: graphs compiled from step 1 on, where prefixpo's layers are compiled (its
  ``metrics.jsonl``; the warm-up before step 1 should leave none);
- **losses** of the first steps. At step 1 the policy is the reference, so both trainers log
  ln 2. Later losses agree only when both train the same pairs in a step: with one step = all the
  pairs (``--pairs`` = ``--batch``) the order does not matter, and the CPU test checks that
  (tests/test_head_to_head.py); otherwise the two trainers shuffle differently.
- **log-probs** (in ``results.json`` only: ``logps_chosen``, ``logps_rejected``): the policy's
  summed log-probs per pair, averaged over each of the first steps' pairs, as both trainers log
  them. Step 1 runs the initial weights, so two prefixpo runs (say the default and
  ``torch_compile=false``, ``packing=false``, which train the same pairs per step) compare there
  without the rounding that the optimizer's first update amplifies.

Same data on both sides: each profile's synthetic groups (``sample_groups``) are written as a JSONL
of ``{"prompt", "chosen", "rejected"}`` strings (TRL's standard format) whose words are token ids
(``w17`` is id 17), and a word-level tokenizer (no BOS; EOS appended to each response by both
trainers) is saved beside the model, so N words are N ids on both sides. Same model and weights: the
``--model`` shape of the profiles file (default ``llama-1b``) with random weights (seed 0, drawn on
``--weights-device``), saved once as a model directory both trainers load. Settings:

- ``trl-default``: TRL's defaults for a model path: fp32 weights, ``bf16=True`` autocast;
- ``trl-best``: bf16 weights (``model_init_kwargs={"dtype": "bfloat16"}``) and cuDNN SDPA off;
- ``prefixpo``: ``bf16: true`` (bf16 weights), plus any ``--prefixpo-set key=value`` (e.g.
  ``packing=true``), named ``--label``.

Both get the same batch (``--batch`` pairs per optimizer step, no accumulation), sigmoid DPO with
beta 0.1, AdamW with the same learning rate, linear schedule without warm-up, clipping at 1.0,
seed 42, dropout off, ``max_length`` above the longest pair, no evaluation, a line per step, no
gradient checkpointing (``--gradient-checkpointing`` turns it on for both). Each run is its own
process (TRL's through this script's ``trl-worker`` command), with its own datasets, inductor and
Triton caches, so memory peaks and compilations do not carry over from one run to the next.

Needs TRL (1.16) and ``datasets`` importable beside prefixpo. On a GPU, from the repository root::

    python scripts/head_to_head.py --out runs/h2h
    python scripts/head_to_head.py --out runs/h2h-pk --model runs/h2h/model --trainers prefixpo \
        --prefixpo-set packing=true --label "prefixpo, packing"       # the same weights, one more setting
    python scripts/head_to_head.py --table-from runs/h2h/results.json runs/h2h-pk/results.json

It writes ``OUT/results.json`` (every number, per-step times, pairs, losses and gradient norms,
versions) and prints a markdown table; the head-to-head table of docs/benchmarks.md comes from it.
Each run's log, config and metrics stay under ``OUT/PROFILE/RUN/``; saved models and compile caches
are removed after each run (``--keep-outputs`` keeps them). TRL's step times come from a
``TrainerCallback`` (a CUDA synchronize at each step's end), prefixpo's from ``metrics.jsonl``
(``logging_steps: 1``). ``--device cpu --dtype float32`` runs on the CPU (the test uses the tiny
config ``examples/configs/tiny-llama.json``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("trl-default", "trl-best", "prefixpo")
PROFILES = ("capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3; words are w4 .. w{vocab-1}
SEED = 42  # both trainers' training seed (prefixpo's default)


def _src_path() -> str | None:
    """``src/`` of this checkout when prefixpo is not installed (added to the path and to the children's)."""
    try:
        import prefixpo  # noqa: F401
        return None
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
        return str(ROOT / "src")


def _profiles_module():
    from prefixpo.bench import profiles

    return profiles


def _model_config(name: str, profiles: dict):
    from prefixpo.bench.models import model_config

    return model_config(name, profiles)


# ---------------------------------------------------------------- data, tokenizer, model
def save_tokenizer(vocab_size: int, path: Path) -> None:
    """A word-level tokenizer: ``w{k}`` is id k (k >= 4), the four specials 0-3, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)} | {f"w{k}": k for k in range(len(SPECIALS), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def write_pairs(groups: list, path: Path) -> int:
    """The groups as JSONL strings (responses start with a space, as TRL joins prompt + response);
    returns the longest prompt + response + EOS in tokens."""
    longest = 0
    with open(path, "w") as f:
        for prompt, responses in groups:
            words = [" ".join(f"w{i}" for i in ids) for ids in (prompt, *responses)]
            f.write(json.dumps({"prompt": words[0], "chosen": " " + words[1], "rejected": " " + words[2]}) + "\n")
            longest = max(longest, len(prompt) + max(len(r) for r in responses) + 1)
    return longest


def make_groups(profiles: dict, name: str, vocab_size: int, pairs: int, seed: int) -> list:
    """The profile's groups as ``(prompt ids, [chosen ids, rejected ids])``, ids moved clear of the
    special tokens (k -> k + 4)."""
    groups = _profiles_module().sample_groups(profiles, name, vocab_size - len(SPECIALS), pairs, seed)
    shift = len(SPECIALS)
    return [([i + shift for i in g.prompt_ids], [[i + shift for i in r] for r in g.response_ids]) for g in groups]


def prepare_model(model: str, profiles: dict, out: Path, device: str = "cpu") -> tuple[Path, int, str]:
    """``(model directory, vocab size, description)``: an existing directory as it is, else the
    profiles' model shape or a config JSON with random bf16 weights (seed 0) drawn on ``device``
    (``--weights-device``; an 8B model's take minutes on the CPU, seconds on a GPU, and are other
    weights), saved once under OUT."""
    if os.path.isdir(model):
        with open(Path(model) / "config.json") as f:
            config = json.load(f)
        return Path(model).resolve(), config["vocab_size"], model
    import torch

    model_dir = out / "model"
    marker = model_dir / "head_to_head.json"
    source = {"model": model if model in profiles.get("models", {}) else str(Path(model).resolve()), "seed": 0,
              "device": torch.device(device).type}  # a seed draws other weights on another device type
    if marker.is_file() and json.loads(marker.read_text()) == source:
        config = json.loads((model_dir / "config.json").read_text())
        return model_dir, config["vocab_size"], model
    from prefixpo.modeling import load_model

    config = _model_config(model, profiles)
    if not getattr(config, "architectures", None):
        config.architectures = [type(config).__name__.removesuffix("Config") + "ForCausalLM"]
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    shutil.rmtree(model_dir, ignore_errors=True)
    weights = load_model(config, dtype=torch.bfloat16, seed=0, device=device)
    weights.save_pretrained(model_dir)
    del weights
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the trainers run in processes of their own
    save_tokenizer(config.vocab_size, model_dir)
    marker.write_text(json.dumps(source))
    return model_dir, config.vocab_size, model


# ---------------------------------------------------------------- TRL worker (its own process)
def trl_worker(spec_path: str) -> None:
    """One TRL DPOTrainer run as ``spec`` says; writes ``result.json`` beside the spec."""
    started = time.time()
    spec = json.loads(Path(spec_path).read_text())
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    cuda = spec["device"] != "cpu"
    if spec["setting"] == "trl-best" and cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    bf16 = spec["dtype"] == "bfloat16"
    weights = "bfloat16" if spec["setting"] == "trl-best" and bf16 else "float32"
    times: dict[str, Any] = {"imported": time.time()}
    steps: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "end": time.time()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps and steps[-1]["step"] == state.global_step:
                steps[-1].update({k: logs[k] for k in ("loss", "grad_norm", "learning_rate", "logps/chosen", "logps/rejected") if k in logs})

    out = Path(spec["run_dir"])
    config = trl.DPOConfig(
        output_dir=str(out / "trl-output"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, seed=SEED, bf16=bf16, use_cpu=not cuda,
        gradient_checkpointing=spec["gradient_checkpointing"], loss_type=["sigmoid"], beta=0.1,
        max_length=spec["max_length"], disable_dropout=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, model_init_kwargs={"dtype": weights})
    data = datasets.load_dataset("json", data_files=spec["data"], split="train")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    trainer = trl.DPOTrainer(model=spec["model"], args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Clock()])
    times["trainer_built"] = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times["train_end"] = time.time()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    trainer.save_model(str(out / "trl-output" / "final"))
    times["saved"] = time.time()
    lengths = [len(p) + len(r) for p, c, rj in zip(trainer.train_dataset["prompt_ids"],
                                                    trainer.train_dataset["chosen_ids"],
                                                    trainer.train_dataset["rejected_ids"]) for r in (c, rj)]
    result = {"worker_started": started, "device_name": torch.cuda.get_device_name() if cuda else None, "times": times, "steps": steps, "peak_gib": peak,
              "weights_dtype": weights, "bf16_autocast": bf16 and weights == "float32",
              "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(), "rows": len(trainer.train_dataset),
              "longest_sequence": max(lengths), "versions": {
                  "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                  "datasets": datasets.__version__}}
    (out / "result.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- runs
def child_env(run_dir: Path, device: str, src: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(run_dir / "cache" / "datasets"),
               PREFIXPO_CACHE=str(run_dir / "cache" / "prefixpo"),
               TORCHINDUCTOR_CACHE_DIR=str(run_dir / "cache" / "inductor"),
               TRITON_CACHE_DIR=str(run_dir / "cache" / "triton"))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    if src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def launch(cmd: list[str], run_dir: Path, env: dict[str, str], first_line: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` (output to ``run_dir/log.txt``); launch and end wall times, and when ``first_line``
    (a metrics file) first held a train record, polled every 50 ms."""
    seen = None
    with open(run_dir / "log.txt", "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            if first_line is not None and seen is None and first_line.is_file():
                if any('"train"' in line for line in first_line.read_text().splitlines()):
                    seen = time.time()
            time.sleep(0.05)
        ended = time.time()
    tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
    return {"rc": proc.returncode, "launched": launched, "ended": ended, "first_seen": seen, "log_tail": tail}


def prefixpo_config(spec: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    import yaml

    cfg = {"model_name_or_path": spec["model"], "tokenizer_name_or_path": spec["tokenizer"],
           "stage": "preference", "dataset": spec["data"], "data": {"use_cache": False},
           "max_length": spec["max_length"], "loss_type": "sigmoid", "beta": 0.1,
           "learning_rate": spec["learning_rate"], "lr_scheduler_type": "linear", "warmup_steps": 0,
           "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
           "max_grad_norm": 1.0, "seed": SEED, "per_device_train_batch_size": spec["batch"],
           "gradient_accumulation_steps": 1, "num_train_epochs": spec["epochs"], "logging_steps": 1,
           "bf16": spec["dtype"] == "bfloat16", "gradient_checkpointing": spec["gradient_checkpointing"],
           "disable_dropout": True, "output_dir": str(Path(spec["run_dir"]) / "output"),
           "disable_progress_bar": True}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--prefixpo-set takes key=value, got {item!r}")
        cfg[key.strip()] = yaml.safe_load(value)
    return cfg


def run_trl(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    run_dir = Path(spec["run_dir"])
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    proc = launch([sys.executable, str(Path(__file__).resolve()), "trl-worker", str(run_dir / "spec.json")],
                  run_dir, env)
    result_path = run_dir / "result.json"
    if proc["rc"] != 0 or not result_path.is_file():
        return {"ok": False, **proc}
    res = json.loads(result_path.read_text())
    begin, ends, steps = res["times"]["train_begin"], [], []
    for s in res["steps"]:
        ends.append(s["end"])
        steps.append({"step": s["step"], "time_s": s["end"] - (ends[-2] if len(ends) > 1 else begin),
                      **{k: s[k] for k in ("loss", "grad_norm", "learning_rate", "logps/chosen", "logps/rejected") if k in s}})
    per_epoch = math.ceil(spec["rows"] / spec["batch"])
    for i, s in enumerate(steps):  # the last batch of an epoch may be short
        in_epoch = i % per_epoch
        s["pairs"] = min(spec["batch"], spec["rows"] - in_epoch * spec["batch"])
    return {"ok": True, **proc, "first_step_s": ends[0] - proc["launched"] if ends else None,
            "peak_gib": res["peak_gib"], "mfu": None, "steps": steps,
            "setup": {k: res[k] for k in ("weights_dtype", "bf16_autocast", "cudnn_sdp", "rows", "longest_sequence")},
            "versions": res["versions"], "device_name": res["device_name"],
            "phases_s": {"to_trainer_built": res["times"]["trainer_built"] - proc["launched"],
                         "train": res["times"]["train_end"] - res["times"]["train_begin"],
                         "save": res["times"]["saved"] - res["times"]["train_end"]}}


def run_prefixpo(spec: dict[str, Any], sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    import yaml

    run_dir = Path(spec["run_dir"])
    cfg = prefixpo_config(spec, sets)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    metrics = Path(cfg["output_dir"]) / "metrics.jsonl"
    proc = launch([sys.executable, "-m", "prefixpo.cli", "train", "--config", str(run_dir / "config.yaml")],
                  run_dir, env, first_line=metrics)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    records = [r for r in records if r.get("split") == "train"]
    if proc["rc"] != 0 or not records:
        return {"ok": False, **proc}
    steps = [{"step": r["step"], "time_s": r["step_time_s"], "pairs": int(r["pairs"]) if float(r["pairs"]).is_integer() else r["pairs"],
              "loss": r["loss"], "grad_norm": r.get("grad_norm"), "learning_rate": r.get("learning_rate"),
              **{k: r[k] for k in ("logps/chosen", "logps/rejected") if k in r},
              **({"mfu": r["mfu"]} if "mfu" in r else {}),
              **({"recompiles": r["recompiles"]} if "recompiles" in r else {})} for r in records]
    first = records[0]
    first_step = first["elapsed_s"] if "elapsed_s" in first else (
        proc["first_seen"] - proc["launched"] if proc["first_seen"] else None)
    startup = next((startup_phases(line) for line in (run_dir / "log.txt").read_text().splitlines()
                    if line.startswith("start-up: ")), None)
    mfus = [r["mfu"] for r in records if r.get("mfu") is not None]
    peaks = [r["max_memory_gib"] for r in records if r.get("max_memory_gib") is not None]
    return {"ok": True, **proc, "first_step_s": first_step,
            "first_step_source": "elapsed_s" if "elapsed_s" in first else "metrics.jsonl polled",
            "peak_gib": max(peaks) if peaks else None,
            "mfu": statistics.median(mfus[1:] or mfus) if mfus else None, "steps": steps,
            "startup_s": startup, "config": cfg, "prefixpo_set": sets}


def startup_phases(line: str) -> dict[str, float]:
    """The seconds of each phase in prefixpo's ``start-up: ...`` line.

    >>> startup_phases("start-up: 9.5s since launch (before setup 4.8s, data 0.2s, warm-up 3.1s)")
    {'total': 9.5, 'before setup': 4.8, 'data': 0.2, 'warm-up': 3.1}
    """
    total, _, phases = line.removeprefix("start-up: ").partition("s since launch (")
    out = {"total": float(total)}
    for item in phases.rstrip(")").split(", "):
        name, _, seconds = item.rpartition(" ")
        out[name] = float(seconds.rstrip("s"))
    return out


def summarize(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Steady pairs/s, slowest step and first losses from a run's per-step times."""
    steps = run["steps"]
    skip = min(warmup, len(steps) - 1)
    timed = [s for s in steps[skip:] if s["time_s"] > 0]
    rates = [s["pairs"] / s["time_s"] for s in timed]
    later = [s["time_s"] for s in steps[1:]]
    slowest = max(range(len(later)), key=later.__getitem__) if later else None
    return {"steps": len(steps), "pairs": sum(s["pairs"] for s in steps), "warmup_steps": skip,
            "steady_pairs_per_s": statistics.median(rates) if rates else None,
            "mean_pairs_per_s_after_warmup": (sum(s["pairs"] for s in timed) / sum(s["time_s"] for s in timed)
                                              if timed else None),
            "first_step_s": run["first_step_s"], "wall_s": run["ended"] - run["launched"],
            "peak_gib": run["peak_gib"], "mfu": run["mfu"],
            "slowest_over_median": later[slowest] / statistics.median(later) if later else None,
            "slowest_step": steps[1 + slowest]["step"] if later else None,
            "losses": [s.get("loss") for s in steps[:5]], "grad_norms": [s.get("grad_norm") for s in steps[:5]],
            # the policy's summed log-probs per pair (both trainers' mean over the step's pairs): at
            # step 1 the weights are the initial ones, so two ways of computing them compare directly
            "logps_chosen": [s.get("logps/chosen") for s in steps[:5]],
            "logps_rejected": [s.get("logps/rejected") for s in steps[:5]],
            # graphs compiled from step 1 on (prefixpo's compiled layers; counted by its trainer)
            "recompiles": max(counted) if (counted := [s["recompiles"] for s in steps if "recompiles" in s]) else None}


# ---------------------------------------------------------------- table
def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict[str, Any]]) -> str:
    """One markdown table over one or more results files (their rows in order, grouped by profile)."""
    rows, meta = [], []
    for res in results:
        m = res["meta"]
        line = (f"{m['pairs']} pairs per profile, batch {m['batch']}, {m['epochs']} epoch(s), model {m['model']}, "
                f"{m['dtype']}, lr {m['learning_rate']}, steady = median after {m['warmup_steps']} steps; "
                + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + (f"; {m['device_name']}"
                                                                             if m.get("device_name") else ""))
        if line not in meta:
            meta.append(line)
        rows += res["runs"]
    order = {p: i for i, p in enumerate(dict.fromkeys(r["profile"] for r in rows))}
    rows = sorted(rows, key=lambda r: order[r["profile"]])
    versus = "trl-best" if any(r["trainer"] == "trl-best" for r in rows) else "trl-default"
    out = [f"<!-- {line} -->" for line in meta]
    out += [f"| profile | trainer | pairs/s (steady) | x {versus} | first step s | wall s | peak GiB | MFU % "
            "| slowest / median | recompiles | losses, steps 1-3 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['profile']} | {r['label']} | failed (exit {r['rc']}) | | | | | | | | |")
            continue
        s = r["summary"]
        base = next((x["summary"]["steady_pairs_per_s"] for x in rows if x["profile"] == r["profile"]
                     and x["trainer"] == versus and x["ok"]), None)
        ratio = s["steady_pairs_per_s"] / base if base and s["steady_pairs_per_s"] else None
        losses = " / ".join(_f(v, ".4f") for v in s["losses"][:3])
        out.append(f"| {r['profile']} | {r['label']} | {_f(s['steady_pairs_per_s'], '.2f')} | {_f(ratio, '.2f')} "
                   f"| {_f(s['first_step_s'], '.1f')} | {_f(s['wall_s'], '.0f')} | {_f(s['peak_gib'], '.1f')} "
                   f"| {_f(s['mfu'] and 100 * s['mfu'], '.1f')} | {_f(s['slowest_over_median'], '.2f')} "
                   f"| {_f(s.get('recompiles'), 'd')} | {losses} |")
    return "\n".join(out)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/h2h", help="output directory (default runs/h2h)")
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated profiles (default all six)")
    p.add_argument("--profiles-file", default=None, help="bench profiles JSON (default the packaged one)")
    p.add_argument("--pairs", type=int, default=2000, help="pairs per profile (default 2000)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step, both trainers (default 4)")
    p.add_argument("--model", default="llama-1b",
                   help="a model of the profiles file, a config JSON, or a model directory (default llama-1b)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="subset of " + ",".join(TRAINERS))
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="bfloat16 (default on cuda): bf16 on both sides; float32 (default on cpu): no bf16 anywhere")
    p.add_argument("--learning-rate", type=float, default=1e-6, help="both trainers (default 1e-6, both defaults)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the steady rate (default 5)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers")
    p.add_argument("--weights-device", default="cpu",
                   help="where the random weights are drawn (default cpu, as in the published runs; cuda draws "
                        "an 8B model's in seconds, but other weights)")
    p.add_argument("--seed", type=int, default=None, help="data seed (default the profiles file's)")
    p.add_argument("--prefixpo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra prefixpo config key (YAML value), repeatable, e.g. packing=true")
    p.add_argument("--label", default=None, help="the prefixpo run's name in the table")
    p.add_argument("--keep-outputs", action="store_true", help="keep saved models and compile caches of each run")
    p.add_argument("--table-from", nargs="+", metavar="RESULTS_JSON",
                   help="print the table of earlier results files and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "trl-worker":
        trl_worker(sys.argv[2])
        return 0
    args = parse_args(argv)
    if args.table_from:
        print(table([json.loads(Path(p).read_text()) for p in args.table_from]))
        return 0
    src = _src_path()
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if unknown := [t for t in trainers if t not in TRAINERS]:
        raise SystemExit(f"unknown trainers {unknown}; choose from {', '.join(TRAINERS)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    label = args.label or " ".join(["prefixpo", *args.prefixpo_set])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profiles = _profiles_module().load_profiles(args.profiles_file)
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    if unknown := [n for n in names if n not in profiles["profiles"]]:
        raise SystemExit(f"unknown profiles {unknown}; the profiles are {', '.join(profiles['profiles'])}")
    model_dir, vocab_size, model_name = prepare_model(args.model, profiles, out, args.weights_device)
    tokenizer_dir = out / "tokenizer"
    save_tokenizer(vocab_size, tokenizer_dir)
    seed = profiles.get("defaults", {}).get("seed", 0) if args.seed is None else args.seed
    versions = _versions()
    results = {"meta": {"model": model_name, "pairs": args.pairs, "epochs": args.epochs, "batch": args.batch,
                        "dtype": dtype, "device": device, "learning_rate": args.learning_rate,
                        "warmup_steps": args.warmup_steps, "gradient_checkpointing": args.gradient_checkpointing,
                        "data_seed": seed, "train_seed": SEED, "versions": versions,
                        "device_name": None, "commit": _commit(), "source_digest": source_digest()},
               "runs": []}
    for name in names:
        profile_dir = out / name
        profile_dir.mkdir(exist_ok=True)
        groups = make_groups(profiles, name, vocab_size, args.pairs, seed)
        longest = write_pairs(groups, profile_dir / "pairs.jsonl")
        for trainer in trainers:
            key = trainer if trainer != "prefixpo" else "-".join(
                "".join(c if c.isalnum() else " " for c in label).split())
            run_dir = profile_dir / key
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            spec = {"setting": trainer, "model": str(model_dir), "tokenizer": str(tokenizer_dir),
                    "data": str(profile_dir / "pairs.jsonl"), "rows": len(groups), "run_dir": str(run_dir),
                    "batch": args.batch, "epochs": args.epochs, "learning_rate": args.learning_rate,
                    "max_length": longest + 8, "dtype": dtype, "device": device,
                    "gradient_checkpointing": args.gradient_checkpointing}
            env = child_env(run_dir, device, src)
            print(f"{name}: {trainer} ...", file=sys.stderr, flush=True)
            run = run_prefixpo(spec, args.prefixpo_set, env) if trainer == "prefixpo" else run_trl(spec, env)
            row = {"profile": name, "trainer": trainer, "label": label if trainer == "prefixpo" else trainer,
                   **run}
            if run["ok"]:
                results["meta"]["device_name"] = results["meta"]["device_name"] or run.get("device_name")
                row["summary"] = summarize(run, args.warmup_steps)
                s = row["summary"]
                print(f"{name}: {row['label']}: {_f(s['steady_pairs_per_s'], '.2f')} pairs/s, first step "
                      f"{_f(s['first_step_s'], '.1f')} s, wall {s['wall_s']:.0f} s, losses {s['losses'][:3]}",
                      file=sys.stderr, flush=True)
            else:
                print(f"{name}: {row['label']} failed (exit {run['rc']}); see {run_dir / 'log.txt'}:\n  "
                      + "\n  ".join(run["log_tail"]), file=sys.stderr, flush=True)
            results["runs"].append(row)
            if not args.keep_outputs:
                for junk in ("cache", "output/final", "trl-output"):
                    shutil.rmtree(run_dir / junk, ignore_errors=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    if device != "cpu" and not results["meta"]["device_name"]:
        results["meta"]["device_name"] = _gpu_name(device)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table([results]))
    return 0 if all(r["ok"] for r in results["runs"]) else 1


def _gpu_name(device: str) -> str | None:
    """The GPU's name from nvidia-smi (the parent process stays off the GPU)."""
    index = device.split(":", 1)[1] if ":" in device else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    try:
        names = subprocess.run(["nvidia-smi", "-i", index or "0", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _commit() -> str | None:
    """The checkout's commit, with ``+modified`` when prefixpo's sources differ from it."""
    try:
        git = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        changed = git(["git", "status", "--porcelain", "--untracked-files=no", "src", "scripts"]).stdout.strip()
        return (commit + ("+modified" if changed else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest(root: Path = ROOT) -> str:
    """SHA-256 (12 hex digits) of prefixpo's sources and this script: which code ran, where a copy of
    the tree travels without its git history (compare with the digest of a checkout)."""
    digest = hashlib.sha256()
    sources = [p for p in (root / "src" / "prefixpo").rglob("*") if p.suffix in (".py", ".json")]  # profiles.json
    for path in sorted(sources) + [root / "scripts" / "head_to_head.py"]:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("prefixpo", "trl", "transformers", "torch", "accelerate", "datasets"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
