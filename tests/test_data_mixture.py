"""Dataset mixtures (prefixpo.data.mixture): per-dataset options over run-wide defaults, the seeded
``weight`` draw, validation with key paths, and `prefixpo train` on mixtures end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from prefixpo.config import ConfigError, TrainConfig, load_stages
from prefixpo.data import DataConfig, load_groups
from prefixpo.data.loading import load_source
from prefixpo.data.mixture import Mixture, MixtureError, load_mixture, resolve_sources, source_labels

QUICK = ROOT / "examples" / "quickstart"
FIXTURES = ROOT / "tests" / "fixtures" / "data"
DEFAULTS = {"split": "train", "format": "auto", "max_length": 256, "max_samples": None, "on_bad_row": "error",
            "num_proc": 1, "seed": 3, "column_map": {"prompt": "q"}}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    """Rows with the explicit columns renamed (``{"prompt": "question", ...}``)."""
    return [{names.get(k, k): v for k, v in r.items()} for r in rows]


# --- resolving sources ---------------------------------------------------------------------------

def test_a_string_is_one_dataset_with_the_defaults():
    [cfg] = resolve_sources("a.jsonl", DEFAULTS)
    assert (cfg.dataset, cfg.split, cfg.max_length, cfg.seed, cfg.fraction) == ("a.jsonl", "train", 256, 3, None)
    assert cfg.column_map == {"prompt": "q"}


def test_per_dataset_keys_override_the_defaults_for_that_dataset_only():
    a, b, c = resolve_sources(["a.jsonl", {"path": "b.jsonl", "column_map": {"chosen": "good"}, "split": "test",
                                           "max_length": 64, "weight": 0.5},
                               {"path": "org/name", "subset": "x", "max_samples": 7, "format": "pairwise"}],
                              DEFAULTS)
    assert (a.column_map, a.split, a.max_length, a.fraction, a.max_samples) == ({"prompt": "q"}, "train", 256,
                                                                                None, None)
    # a per-dataset column_map replaces the default one (it is not merged into it)
    assert (b.column_map, b.split, b.max_length, b.fraction) == ({"chosen": "good"}, "test", 64, 0.5)
    assert (c.dataset, c.subset, c.max_samples, c.format, c.max_length) == ("org/name", "x", 7, "pairwise", 256)


def test_one_mapping_is_one_dataset_with_options():
    [cfg] = resolve_sources({"path": "a.jsonl", "weight": "5e-1"}, DEFAULTS)  # YAML reads 5e-1 as a string
    assert cfg.fraction == 0.5


def test_train_config_defaults_train_and_eval_datasets_separately():
    cfg = TrainConfig(model_name_or_path="m", dataset=["a.jsonl", {"path": "b.jsonl", "max_length": 32}],
                      dataset_split="dev", dataset_format="explicit", max_samples=9, max_length=128, seed=5,
                      eval_dataset={"path": "e.jsonl", "column_map": {"prompt": "query"}}, eval_split="test",
                      data={"column_map": {"prompt": "question"}, "truncation": "drop"}).validate()
    a, b = cfg.data_sources()
    [e] = cfg.data_sources(evaluation=True)
    assert (a.split, a.format, a.max_samples, a.max_length, a.seed, a.truncation) == ("dev", "explicit", 9, 128,
                                                                                      5, "drop")
    assert (a.column_map, b.column_map, b.max_length) == ({"prompt": "question"}, {"prompt": "question"}, 32)
    assert (e.split, e.column_map, e.truncation) == ("test", {"prompt": "query"}, "drop")


def test_existing_single_dataset_configs_resolve_as_before():
    for stage in load_stages(ROOT / "examples" / "quickstart.yaml"):
        [cfg] = stage.data_sources()
        # the quickstart's `data: {use_chat_template: true}` reaches every stage's dataset; an SFT stage
        # does not merge rows by prompt nor compare responses in pairs (it trains each group's first response)
        assert cfg == DataConfig(stage.dataset, split="train", max_length=64, seed=0, use_chat_template=True,
                                 merge_prompts=stage.stage != "sft", pairs=stage.stage != "sft")


def test_labels_name_split_subset_and_repeats():
    assert source_labels([DataConfig("hh.jsonl"), DataConfig("org/x", subset="s", split="test"),
                          DataConfig("hh.jsonl")]) == ["hh.jsonl #0", "org/x (s) [test]", "hh.jsonl #2"]


def test_mixture_line_counts_groups_per_dataset():
    m = Mixture([], ["hh.jsonl", "shp.jsonl"], [], [120, 80])
    assert m.line() == "mixture: 2 datasets, 200 groups: hh.jsonl 120 (60%), shp.jsonl 80 (40%)"


# --- weight: a seeded fraction of the rows -------------------------------------------------------

@pytest.mark.parametrize(("rows", "weight", "expected"), [(40, 0.25, 10), (40, 1.0, 40), (100, 0.29, 29),
                                                         (7, 0.5, 3), (3, 0.01, 1)])
def test_weight_draws_the_fraction_of_rows(tmp_path, rows, weight, expected):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(rows)])
    [cfg] = resolve_sources([{"path": str(path), "weight": weight}], {"seed": 0})
    assert len(load_source(cfg).rows) == expected


def test_weight_is_drawn_by_seed(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)])

    def drawn(seed: int, **extra) -> list[int]:
        return load_source(DataConfig(str(path), fraction=0.2, seed=seed, **extra)).rows["_row"]

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)
    assert len(set(drawn(1))) == 10 and drawn(1) != list(range(1, 11))  # drawn, not the first rows
    assert drawn(1, max_samples=4) == drawn(1)[:4]  # a max_samples default caps the draw
    _, report = load_groups(DataConfig(str(path), fraction=0.2, seed=1, cache_dir=None), None)
    assert (report.rows_read, report.rows_kept) == (10, 10)


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    (["a.jsonl", {"path": "b.jsonl", "colum_map": {}}],
     "config key `dataset[1].colum_map`: unknown per-dataset key; did you mean `column_map`?"),
    (["a.jsonl", {"weight": 0.5}], "config key `dataset[1]`: a dataset mapping needs `path`"),
    ([{"path": "a", "weight": 0}], "config key `dataset[0].weight`: must be the fraction of the dataset's rows"),
    ([{"path": "a", "weight": 1.5}], "config key `dataset[0].weight`: must be the fraction"),
    ([{"path": "a", "weight": "half"}], "config key `dataset[0].weight`: must be the fraction"),
    ([{"path": "a", "weight": 0.5, "max_samples": 10}],
     "config key `dataset[0]`: give weight (the fraction of its rows to use) or max_samples (a row count), not both"),
    (["a", 3], "config key `dataset[1]`: must be a path or hub name, or a mapping with `path`, got int 3"),
    (3, "config key `dataset`: must be a path or hub name, a mapping with `path`, or a list of them, got int 3"),
    ([], "config key `dataset`: is required"),
    ({"path": "a", "colum_map": {}}, "config key `dataset.colum_map`: unknown per-dataset key; did you mean"),
    ([{"path": ""}], "config key `dataset[0].path`: must be a non-empty string"),
    ([{"path": "a", "column_map": {"prompt": 3}}], "config key `dataset[0].column_map`: column_map={'prompt': 3} must map names to names"),
    ([{"path": "a", "max_samples": 0}], "config key `dataset[0].max_samples`: max_samples=0 must be a positive integer"),
    ([{"path": "a", "format": "jsonl"}], "config key `dataset[0].format`: format='jsonl' is not one of auto"),
    ([{"path": "a", "num_proc": 4}], "config key `dataset[0].num_proc`: applies to every dataset at once: set "
                                     "`dataset_num_proc` instead"),
    ([{"path": "a", "dataset": "b"}], "config key `dataset[0].dataset`: is called `path` in a dataset entry"),
    ([{"path": "a", "max_prompt_length": 300}], "config key `dataset[0].max_prompt_length`: max_prompt_length=300 must "
                                                "be less than max_length=256"),
])
def test_bad_dataset_values_name_the_key_path(value, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model_name_or_path="m", dataset=value, max_length=256).validate()
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_eval_dataset_is_checked_under_its_own_name():
    with pytest.raises(ConfigError, match=r"config key `eval_dataset\[0\]\.splitt`: .* did you mean `split`"):
        TrainConfig(model_name_or_path="m", dataset="a", eval_dataset=[{"path": "e", "splitt": "test"}]).validate()


def test_a_bad_data_block_stops_before_loading():
    with pytest.raises(ConfigError, match="data config `data`: unknown data config key 'colum_map'"):
        TrainConfig(model_name_or_path="m", dataset="a", data={"colum_map": {}}).validate()


def test_mixture_error_is_a_data_error():
    with pytest.raises(MixtureError) as err:
        resolve_sources([{"path": "a", "weight": 2}], {})
    assert err.value.key == "dataset[0].weight"


# --- loading -------------------------------------------------------------------------------------

def test_load_mixture_concatenates_sources_with_their_own_columns(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(QUICK / "tokenizer"))
    pref = rows_of(QUICK / "data" / "pref_train.jsonl")
    qa = write_rows(tmp_path / "qa.jsonl", renamed(pref[:6], {"prompt": "question", "chosen": "good",
                                                               "rejected": "bad"}))
    explicit = write_rows(tmp_path / "explicit.jsonl", pref[6:16])
    configs = resolve_sources([{"path": str(qa), "column_map": {"prompt": "question", "chosen": "good",
                                                                "rejected": "bad"}},
                               {"path": str(explicit), "weight": 0.5}],
                              {"max_length": 64, "seed": 0, "cache_dir": str(tmp_path / "cache")})
    seen: list[str] = []
    mixture = load_mixture(configs, tokenizer, on_report=seen.append)
    assert mixture.counts == [6, 5] and len(mixture.groups) == 11
    assert [r.format for r in mixture.reports] == ["explicit", "explicit"]
    assert len(seen) == 2 and seen[1].startswith(f"{explicit}: format explicit, 5 rows read, 5 kept")
    single, _ = load_groups(configs[0], tokenizer)
    assert mixture.groups[:6] == list(single)  # the first source's groups, in order
    assert mixture.line() == f"mixture: 2 datasets, 11 groups: {qa} 6 (54.5%), {explicit} 5 (45.5%)"


# --- `prefixpo train` end to end -----------------------------------------------------------------

def run_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PREFIXPO_CACHE": str(tmp_path / "cache")}
    exe = Path(sys.executable).with_name("prefixpo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefixpo.cli"]
    return subprocess.run(cmd + ["train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tiny_run(tmp_path: Path, **keys) -> dict:
    return {"model_name_or_path": str(QUICK / "model" / "config.json"), "tokenizer_name_or_path": str(QUICK / "tokenizer"),
            "output_dir": str(tmp_path / "run"), "seed": 0, "max_length": 64, "max_steps": 2,
            "per_device_train_batch_size": 4, "learning_rate": 1.0e-3, "reference_mode": "model",
            "disable_progress_bar": True, "torch_num_threads": 1, **keys}


MIXTURE_LINE = re.compile(r"^mixture: (\d+) datasets, (\d+) groups: (.*)$", re.M)


def mixture_counts(stderr: str) -> list[tuple[int, dict[str, tuple[int, float]]]]:
    """Each mixture line of a run's stderr: (groups, {label: (count, percent)})."""
    out = []
    for m in MIXTURE_LINE.finditer(stderr):
        parts = re.findall(r"(\S+) (\d+) \(([\d.]+)%\)(?:, |$)", m.group(3))
        assert len(parts) == int(m.group(1))
        out.append((int(m.group(2)), {p[0]: (int(p[1]), float(p[2])) for p in parts}))
    return out


def test_train_on_a_mixture_with_different_columns_and_an_eval_column_map(tmp_path):
    pref, held = rows_of(QUICK / "data" / "pref_train.jsonl"), rows_of(QUICK / "data" / "pref_eval.jsonl")
    qa = write_rows(tmp_path / "qa.jsonl", renamed(pref[:30], {"prompt": "question", "chosen": "good",
                                                                "rejected": "bad"}))
    explicit = write_rows(tmp_path / "explicit.jsonl", pref[30:50])
    evals = write_rows(tmp_path / "eval.jsonl", renamed(held[:8], {"prompt": "query", "chosen": "better",
                                                                   "rejected": "worse"}))
    config = tiny_run(tmp_path, dataset=[
        {"path": str(qa), "column_map": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        str(explicit),
    ], eval_dataset=[{"path": str(evals), "column_map": {"prompt": "query", "chosen": "better", "rejected": "worse"}}],
        eval_steps=2)
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    proc = run_train(["--config", str(tmp_path / "mix.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_qa, n_explicit, n_eval = (len(rows_of(p)) for p in (qa, explicit, evals))  # the oracle: rows in the files
    [(total, counts)] = mixture_counts(proc.stderr)
    assert total == n_qa + n_explicit
    assert counts == {str(qa): (n_qa, pytest.approx(100 * n_qa / total, abs=0.05)),
                      str(explicit): (n_explicit, pytest.approx(100 * n_explicit / total, abs=0.05))}
    for path, n in ((qa, n_qa), (explicit, n_explicit), (evals, n_eval)):
        assert f"{path}: format explicit, {n} rows read, {n} kept" in proc.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("split") == "eval"] == [0, 2]  # evaluated on the eval mixture
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["dataset"] == config["dataset"] and saved["eval_dataset"] == config["eval_dataset"]


def test_train_on_hh_and_shp_from_the_command_line(tmp_path):
    hh, shp = FIXTURES / "implicit_hh.jsonl", FIXTURES / "pairwise_shp.jsonl"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_run(tmp_path)))
    rel = [str(p.relative_to(ROOT)) for p in (hh, shp)]
    proc = run_train(["--config", str(tmp_path / "base.yaml"), "--dataset", f"[{rel[0]}, {rel[1]}]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_hh, n_shp = len(rows_of(hh)), len(rows_of(shp))
    assert f"{rel[0]}: format implicit, {n_hh} rows read" in proc.stderr
    assert f"{rel[1]}: format pairwise, {n_shp} rows read" in proc.stderr
    [(total, counts)] = mixture_counts(proc.stderr)
    assert total == n_hh + n_shp and {k: v[0] for k, v in counts.items()} == {rel[0]: n_hh, rel[1]: n_shp}


def test_quickstart_stages_train_on_mixtures(tmp_path):
    """SFT and preference stages each on a two-dataset mixture, chosen per stage on the command line."""
    sft = [FIXTURES / "sft_messages.jsonl", FIXTURES / "sft_prompt_completion.jsonl"]
    pref = [FIXTURES / "implicit_hh.jsonl", FIXTURES / "pairwise_shp.jsonl"]
    proc = run_train(["--config", "examples/quickstart.yaml", "--output_dir", str(tmp_path / "run"), "--max_steps",
                      "2", "--disable_progress_bar", "true",
                      "--sft.dataset", yaml.safe_dump([str(p) for p in sft], default_flow_style=True),
                      "--preference.dataset", yaml.safe_dump([str(p) for p in pref], default_flow_style=True)],
                     tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sft_total, sft_counts), (pref_total, pref_counts) = mixture_counts(proc.stderr)
    assert {k: v[0] for k, v in sft_counts.items()} == {str(p): len(rows_of(p)) for p in sft}
    assert {k: v[0] for k, v in pref_counts.items()} == {str(p): len(rows_of(p)) for p in pref}
    assert (tmp_path / "run" / "1-preference" / "final").is_dir()


def test_a_bad_per_dataset_key_exits_2_with_one_line(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_run(tmp_path)))
    proc = run_train(["--config", str(tmp_path / "base.yaml"), "--dataset",
                      "[tests/fixtures/data/implicit_hh.jsonl, {path: tests/fixtures/data/pairwise_shp.jsonl, "
                      "colum_map: {prompt: history}}]"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "prefixpo train: config key `dataset[1].colum_map`: unknown per-dataset key; did you mean `column_map`?"]
    assert not (tmp_path / "run").exists()


def test_the_yaml_examples_of_the_docs_are_valid_configs():
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Datasets and mixtures"):text.index("## What a step does")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert len(TrainConfig(**yaml.safe_load(block)).validate().data_sources()) >= 2
    forum = TrainConfig(**yaml.safe_load(blocks[1])).validate()
    assert [c.fraction for c in forum.data_sources()] == [None, 0.25, None]
    assert forum.data_sources(evaluation=True)[0].column_map == {"prompt": "query", "chosen": "better",
                                                                 "rejected": "worse"}
