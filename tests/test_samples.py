"""generate_during_eval: policy and reference samples, written as JSONL and logged to the trackers."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from test_train import QUICK, launch_two, write_config

from prefixpo.cli import main

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The quickstart's tiny model with seeded random weights, saved (the runs' and the oracle's base)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(QUICK / "model" / "config.json"))
    path = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(path)
    return path


def samples_config(directory: Path, base: Path, **overrides) -> Path:
    """2 eval prompts sampled at steps 0 and 2; 47 rows, as the 2-process tests of test_train."""
    settings = {"model_name_or_path": str(base), "max_samples": 47, "max_steps": 2, "save_steps": None,
                "gradient_accumulation_steps": 1, "torch_num_threads": 1, "eval_steps": 2,
                "eval_dataset": str(QUICK / "data" / "pref_eval.jsonl"), "generate_during_eval": True,
                "num_generations": 2, "max_new_tokens": MAX_NEW_TOKENS, "seed": 3}
    return write_config(directory, **{**settings, **overrides})


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, base_model) -> Path:
    """One process, gradient_accumulation_steps 2 (2 ranks x 1), reporting to tensorboard."""
    pytest.importorskip("tensorboard")
    directory = tmp_path_factory.mktemp("one")
    config = samples_config(directory, base_model, report_to="tensorboard")
    assert main(["train", "--config", str(config), "--gradient_accumulation_steps", "2"]) == 0
    return directory / "run"


def oracle(base: Path, config: Path) -> list[str]:
    """The frozen base model's samples of the run's eval prompts, generated here: sdpa attention,
    do_sample with the generation config's defaults, seed + prompt index."""
    from transformers import AutoModelForCausalLM

    from prefixpo.config import load_stages
    from prefixpo.trainer import load_data, load_tokenizer

    (cfg,) = load_stages(config, [])
    tokenizer = load_tokenizer(cfg)
    groups = load_data(cfg, tokenizer, evaluation=True)[: cfg.num_generations]
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa").eval()
    texts = []
    for i, g in enumerate(groups):
        ids = torch.tensor([list(g.prompt_ids)])
        torch.manual_seed(cfg.seed + i)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=True, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_samples_have_policy_and_reference_and_the_reference_is_the_base_model(one_process, base_model):
    at_start, later = read_samples(one_process / "samples" / "step-0.jsonl"), \
        read_samples(one_process / "samples" / "step-2.jsonl")
    assert [list(r) for r in at_start + later] == [["step", "prompt", "policy", "reference"]] * 4
    assert [r["step"] for r in at_start + later] == [0, 0, 2, 2]
    assert [r["prompt"] for r in at_start] == [r["prompt"] for r in later]
    expected = oracle(base_model, one_process.parent / "cfg.yaml")
    assert [r["reference"] for r in at_start] == expected  # the frozen reference, under the same seed
    assert [r["reference"] for r in later] == expected
    assert [r["policy"] for r in at_start] == expected  # step 0: the same weights, the same seed
    assert all(r["policy"] for r in later)


def test_under_lora_the_reference_is_the_policy_with_adapters_off(tmp_path, base_model):
    config = samples_config(tmp_path, base_model, use_peft=True, lora_r=4, learning_rate=1e-2,
                            reference_mode="auto")
    assert main(["train", "--config", str(config)]) == 0
    expected = oracle(base_model, config)
    at_start, later = (read_samples(tmp_path / "run" / "samples" / f"step-{s}.jsonl") for s in (0, 2))
    assert [r["reference"] for r in at_start + later] == expected * 2
    assert [r["policy"] for r in at_start] == expected  # B = 0 at the start: the adapters change nothing


def test_tensorboard_holds_the_samples_table(one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in one_process.rglob("events.out.tfevents.*"):  # (the hparams are in a file of their own)
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        if "eval/samples/text_summary" in acc.Tags()["tensors"]:  # add_text's tag
            logged.update({e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("eval/samples/text_summary")})
    assert sorted(logged) == [0, 2]
    rows = read_samples(one_process / "samples" / "step-2.jsonl")
    assert logged[2].startswith("| step | prompt | policy | reference |")
    assert len(logged[2].splitlines()) == 2 + len(rows)


def test_wandb_gets_a_table_with_the_four_columns(monkeypatch):
    from prefixpo.samples import log_rows

    tables, logged = [], []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data
            tables.append(self)

    class Run:
        def log(self, values, step=None):
            logged.append((values, step))

    class Accelerator:
        def get_tracker(self, name, unwrap=False):
            assert name == "wandb" and unwrap
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=Table))
    rows = [{"step": 4, "prompt": "Q", "policy": "a", "reference": None}]
    log_rows(rows, 4, Accelerator(), ["wandb"])
    (table,) = tables
    assert table.columns == ["step", "prompt", "policy", "reference"] and table.data == [[4, "Q", "a", None]]
    assert logged == [({"eval/samples": table}, 4)]


@pytest.mark.parametrize("settings", [{"loss_type": "simpo", "reference_mode": "auto"},
                                      {"reference_mode": "precomputed"}], ids=["reference-free", "precomputed"])
def test_without_a_reference_model_the_reference_is_null(tmp_path, base_model, settings, monkeypatch):
    monkeypatch.setenv("PREFIXPO_CACHE", str(tmp_path / "cache"))
    config = samples_config(tmp_path, base_model, max_steps=1, eval_steps=None, num_generations=1, **settings)
    assert main(["train", "--config", str(config)]) == 0
    (row,) = read_samples(tmp_path / "run" / "samples" / "step-0.jsonl")
    assert row["reference"] is None and row["policy"] is not None


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_sample_what_one_process_samples(one_process, base_model, tmp_path, engine):
    """2 CPU ranks with the one-process run's global batch. DDP: the main process generates alone;
    FSDP2: both ranks generate (synced_gpus) on the sharded policy and reference, the main one writes."""
    launcher = [str(Path(__file__).with_name("fsdp_cpu.py"))] if engine == "fsdp2" else ["-m", "prefixpo.cli"]
    launch_two(*launcher, "train", "--config", str(samples_config(tmp_path, base_model)))
    for step in (0, 2):
        name = f"step-{step}.jsonl"
        assert read_samples(tmp_path / "run" / "samples" / name) == read_samples(one_process / "samples" / name)
