"""prefixpo.sources: a wrong model, tokenizer, dataset or checkpoint fails at once, in one line.

Unit tests of the classification (the Hub's metadata call is monkeypatched), then the installed
``prefixpo`` command in a subprocess for each case: exit 2, one stderr line naming the key or
flag and the value, no traceback, in a few seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefixpo import sources
from prefixpo.config import ConfigError, load_stages
from prefixpo.sources import SourceError, check, check_checkpoint, check_model, check_stages, looks_like_path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MODEL_KEY = "config key `model_name_or_path`"
ASK_HUB = sources._ask_hub


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No memory of earlier checks, an empty Hugging Face cache, online, and a Hub that must not be asked
    unless a test says so."""
    monkeypatch.setattr(sources, "_found", {})
    monkeypatch.setattr(sources, "_hub_unreachable", None)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def never(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(sources, "_ask_hub", never)


def hub_answers(monkeypatch, answer) -> list[str]:
    """Replace the metadata calls with ``answer`` (an exception to raise, or None); returns the names asked."""
    from huggingface_hub import HfApi

    monkeypatch.setattr(sources, "_ask_hub", ASK_HUB)
    asked: list[str] = []

    def info(self, name, timeout=None, **kwargs):
        asked.append(name)
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer()
        return object()

    monkeypatch.setattr(HfApi, "model_info", info)
    monkeypatch.setattr(HfApi, "dataset_info", info)
    return asked


def cache_model(cache: Path, name: str, files: tuple[str, ...] = ("config.json",)) -> None:
    """A model in the Hub cache layout: refs/main -> snapshots/SHA/FILES."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    for f in files:
        (repo / "snapshots" / "abc123" / f).write_text("{}")


# --- classification -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["./m", "../m", "/abs/m", "~/m", "data.jsonl", "x.parquet", "org/a/b", "a b",
                                   "runs/nowhere/checkpoint-5", "-bad"])
def test_path_like(value):
    assert looks_like_path(value)


@pytest.mark.parametrize("value", ["gpt2", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-0.5B", "nosuch-model"])
def test_hub_like(value):
    assert not looks_like_path(value)


def test_missing_local_path_is_never_sent_to_the_hub():
    with pytest.raises(SourceError) as err:
        check_model("./nosuch-model", MODEL_KEY)
    assert str(err.value) == f"{MODEL_KEY}: no local directory ./nosuch-model (and it is not a Hub name)"
    with pytest.raises(SourceError, match="^dataset: no local file missing.jsonl "):
        check("missing.jsonl", "dataset", "dataset")


def test_local_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SourceError, match=r"is a directory but not a model \(it has none of config.json"):
        check_model(str(tmp_path / "m"), MODEL_KEY)
    with pytest.raises(SourceError, match="is a directory but not a tokenizer"):
        check(str(ROOT / "examples" / "quickstart" / "model"), "tokenizer", "t")  # config.json only
    (tmp_path / "m" / "config.json").write_text("{}")  # a config without weights: random weights only from the file
    with pytest.raises(SourceError, match=r"holds no weights .* give its config file: .*config.json"):
        check_model(str(tmp_path / "m"), MODEL_KEY)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    assert check_model(str(tmp_path / "m"), MODEL_KEY).where == "local"
    assert check(str(ROOT / "examples" / "quickstart" / "tokenizer"), "tokenizer", "t").where == "local"


def test_config_json_file_only_where_allowed(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text("{}")
    assert check_model(str(config), "--model", config_file=True).where == "local"
    with pytest.raises(SourceError, match="is a file, not a model directory"):
        check_model(str(config), MODEL_KEY)


def test_offline_hub_name_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        check("nosuch-org/nosuch-tok", "tokenizer", "config key `tokenizer_name_or_path`")
    assert str(err.value) == ("config key `tokenizer_name_or_path`: nosuch-org/nosuch-tok is not in the local Hugging "
                              "Face cache and offline mode is on (HF_HUB_OFFLINE=1); download it first, or give a "
                              "local path")


def test_offline_hub_name_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cache_model(tmp_path / "hf-cache", "org/cached")
    assert check_model("org/cached", MODEL_KEY) == sources.Found("org/cached", "cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match="HF_DATASETS_OFFLINE=1"):
        check("org/pairs", "dataset", "dataset")
    (tmp_path / "datasets-cache" / "org___pairs").mkdir(parents=True)
    assert check("org/pairs", "dataset", "dataset").where == "cache"


def test_hub_not_found(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
    Exception.__init__(not_found, "404 Client Error")
    hub_answers(monkeypatch, not_found)
    with pytest.raises(SourceError) as err:
        check_model("nosuch-org/nosuch-model", MODEL_KEY)
    assert str(err.value) == (f"{MODEL_KEY}: no model nosuch-org/nosuch-model on the Hugging Face Hub (private or "
                              "gated repos need `hf auth login`)")


def test_hub_found(monkeypatch):
    asked = hub_answers(monkeypatch, None)
    assert check_model("org/model", MODEL_KEY).where == "hub"
    assert check_model("org/model", MODEL_KEY).where == "hub"
    assert asked == ["org/model"]  # checked once per process


def test_hub_unreachable_falls_back_to_the_cache(monkeypatch, tmp_path):
    asked = hub_answers(monkeypatch, ConnectionError("Name or service not known"))
    with pytest.raises(SourceError) as err:
        check_model("org/model", MODEL_KEY)
    assert str(err.value).startswith(f"{MODEL_KEY}: the Hub could not be reached (ConnectionError after ")
    assert str(err.value).endswith("and org/model is not in the local cache; check the name, your network, or "
                                   "download it first")
    cache_model(tmp_path / "hf-cache", "org/other", ("tokenizer.json",))
    assert check("org/other", "tokenizer", "t").where == "cache"
    assert asked == ["org/model"]  # once unreachable, not asked again


def test_hanging_hub_is_given_up_on_after_the_timeout(monkeypatch):
    hub_answers(monkeypatch, lambda: time.sleep(30))
    monkeypatch.setattr(sources, "HUB_TIMEOUT", 0.5)
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not be reached \(no answer in 0.5 s"):
        check_model("org/model", MODEL_KEY)
    assert time.monotonic() - start < 1.5


def test_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceError) as err:
        check_checkpoint("runs/nowhere/checkpoint-5", out)
    assert str(err.value) == ("config key `resume_from_checkpoint`: no checkpoint directory runs/nowhere/checkpoint-5; "
                              f"{out} holds no finished checkpoint")
    for step in (3, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "training_state.pt").write_bytes(b"")
    (out / "checkpoint-9").mkdir()  # unfinished
    with pytest.raises(SourceError, match=f"checkpoint-9 is not a checkpoint directory \\(no training_state.pt\\); "
                                          f"{out} holds checkpoint-3, checkpoint-6 \\(or use `latest`\\)$"):
        check_checkpoint(str(out / "checkpoint-9"), out)
    check_checkpoint(str(out / "checkpoint-6"), out)
    check_checkpoint("latest", out)


def test_stages_trust_earlier_stages_outputs_and_name_the_key(tmp_path):
    stages = load_stages(QUICKSTART, [f"--output_dir={tmp_path}"])
    check_stages(stages)  # stage 2's model, runs/.../0-sft/final, does not exist yet
    stages = load_stages(QUICKSTART, [f"--output_dir={tmp_path}", "--preference.eval_dataset", "nowhere/eval.jsonl"])
    with pytest.raises(ConfigError, match=r"^config key `eval_dataset` \(stage preference\): no local file "
                                          "nowhere/eval.jsonl"):
        check_stages(stages)


def test_data_loading_never_sends_a_missing_file_to_the_hub():
    from prefixpo.data import DataConfig, DataError
    from prefixpo.data.loading import load_source

    with pytest.raises(DataError, match="^dataset: no local file missing.jsonl"):
        load_source(DataConfig(dataset="missing.jsonl"))


# --- the command, end to end --------------------------------------------------------------------

def command_seconds(command: str) -> float:
    """How long ``prefixpo COMMAND --help`` takes: the imports every run pays before any check."""
    start = time.monotonic()
    subprocess.run(["prefixpo", command, "--help"], capture_output=True, check=True, cwd=ROOT)
    return time.monotonic() - start


def run_prefixpo(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                 "HF_DATASETS_OFFLINE")}
    full_env.update(HF_HOME=str(tmp_path / "hf-home"), **env)  # an empty Hugging Face cache
    start = time.monotonic()
    proc = subprocess.run(["prefixpo", *args], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=120)
    return proc, time.monotonic() - start


def assert_one_line(proc: subprocess.CompletedProcess, seconds: float, limit: float, *names: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    print(f"{seconds:.2f} s: {lines[0]}")
    assert seconds < limit, (seconds, lines[0])


def limit_for(command: str, extra: float = 0.0) -> float:
    """5 s, or the command's start-up time (torch, datasets imports) plus 2 s on a machine so busy that
    starting up alone takes more than 3 s."""
    return max(5.0, command_seconds(command) + 2.0) + extra


TRAIN_CASES = {
    "model": (["--model_name_or_path", "./nosuch-model"], {}, ["model_name_or_path", "./nosuch-model"]),
    "tokenizer_offline": (["--tokenizer_name_or_path", "nosuch-org/nosuch-tok"], {"HF_HUB_OFFLINE": "1"},
                          ["tokenizer_name_or_path", "nosuch-org/nosuch-tok", "offline"]),
    "dataset": (["--sft.dataset", "missing.jsonl"], {}, ["`dataset`", "missing.jsonl"]),
    "ref_model": (["--preference.ref_model_name_or_path", "../nosuch-ref"], {},
                  ["ref_model_name_or_path", "../nosuch-ref"]),
    "checkpoint": (["--resume_from_checkpoint", "runs/nowhere/checkpoint-5"], {},
                   ["resume_from_checkpoint", "runs/nowhere/checkpoint-5", "holds no finished checkpoint"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_fails_fast(case, tmp_path):
    args, env, names = TRAIN_CASES[case]
    proc, seconds = run_prefixpo(["train", "--config", str(QUICKSTART), "--output_dir", str(tmp_path / "out"),
                                  *args], tmp_path, **env)
    assert_one_line(proc, seconds, limit_for("train"), "prefixpo train: config key `", *names)
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_train_hub_name_online(tmp_path):
    """The real network path: here the Hub is unreachable (or, with a network, says it has no such model);
    either way one line, quickly."""
    proc, seconds = run_prefixpo(["train", "--config", str(QUICKSTART), "--output_dir", str(tmp_path / "out"),
                                  "--tokenizer_name_or_path", "nosuch-org/nosuch-tok"], tmp_path)
    assert_one_line(proc, seconds, limit_for("train", sources.HUB_TIMEOUT), "tokenizer_name_or_path",
                    "nosuch-org/nosuch-tok")
    assert "could not be reached" in proc.stderr or "on the Hugging Face Hub" in proc.stderr


def test_verify_hub_hanging(tmp_path):
    """A Hub that accepts the connection and never answers (a silent proxy): given up on after HUB_TIMEOUT."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc, seconds = run_prefixpo(["verify", "--model", "nosuch-org/nosuch-model"], tmp_path,
                                     HTTPS_PROXY=proxy, https_proxy=proxy, PREFIXPO_HUB_TIMEOUT="1")
    assert_one_line(proc, seconds, limit_for("verify", 1.0), "--model", "nosuch-org/nosuch-model",
                    "no answer in 1 s")


@pytest.mark.parametrize("args,names", [
    (["prepare", "--dataset", "missing.jsonl"], ["--dataset", "missing.jsonl"]),
    (["prepare", "--dataset", "examples/quickstart/data/pref_train.jsonl", "--tokenizer", "./nosuch"],
     ["--tokenizer", "./nosuch"]),
    (["verify", "--model", "./nosuch"], ["--model", "./nosuch"]),
])
def test_prepare_and_verify_fail_fast(args, names, tmp_path):
    proc, seconds = run_prefixpo(args, tmp_path)
    assert_one_line(proc, seconds, limit_for(args[0]), f"prefixpo {args[0]}: ", *names)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
