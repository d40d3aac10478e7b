"""The docs as a user reads them.

Every command line shown in README.md and docs/*.md (fenced shell blocks, and inline spans that
start with ``prefixpo ``) is found here and either run through the installed executable, in a
subprocess, from a scratch directory beside the repository's ``examples/`` (hub names and
placeholders replaced by the repository's tiny model, tokenizer and data, see ``STAND_INS``), or
matched by a rule of ``NOT_RUN_HERE`` that says why and where it runs instead (the GPU, the test
command itself). A doc line that matches neither fails, so a new command cannot go unchecked, and a
documented command that stops working fails CI.

docs/training.md's key table is checked against ``TrainConfig``: the same keys, the same defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from prefixpo.config import TrainConfig

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREF = "examples/quickstart/data/pref_train.jsonl"
TOKENIZER = "examples/quickstart/tokenizer"
MODEL = "examples/quickstart/model/config.json"
PREFIXPO = shutil.which("prefixpo") or "prefixpo"
SHELL_WORDS = ("prefixpo", "python", "accelerate", "bash", "torchrun")

# commands that are not run here: (pattern, where they run instead)
NOT_RUN_HERE = [
    (r"^python -m pip install ", "the install: .ci/run runs the README's test install on a fresh machine"),
    (r"^python -m pytest -q$", "the test command itself (.ci/run)"),
    (r"^prefixpo train --config examples/quickstart\.yaml$", "tests/test_quickstart.py runs it as typed"),
    (r"scripts/gpu_|--device cuda|--backend flex|--model llama-1b|bench --attention",
     "needs a GPU: its device runs are in docs/benchmarks.md and docs/verification.md"),
    (r"^accelerate launch .*--num_processes 8",
     "8 GPUs; the same launch on 2 CPU ranks: tests/test_train.py (FSDP2, DDP), tests/test_deepspeed.py"),
    (r"^PREFIXPO_DATA_BENCH=1 ", "the opt-in 100k-row timing of docs/data.md"),
    (r"^python scripts/head_to_head\.py ", "a GPU and TRL; the same script on CPU with a tiny model: "
     "tests/test_head_to_head.py"),
]

# placeholders and hub names -> local stand-ins (applied in order)
STAND_INS = [
    (r"meta-llama/Llama-3\.1-8B-Instruct", TOKENIZER),
    (r"\b(my_)?pairs\.jsonl\b", PREF),
    (r"(?<=\s)\./tokenizer\b", TOKENIZER),
    (r"--model (NAME_OR_PATH|NAME)\b", "--model examples/configs/tiny-llama.json"),
    (r"\bRUN_DIR\b", "runs/my-run"),
    (r"--dataset \.\.\.", f"--dataset {PREF}"),
    (r"--config (\.\.\.|CONFIG\.yaml|my\.yaml)", "--config tiny.yaml"),
    (r"\[--key value \.\.\.\] \[--STAGE\.key value \.\.\.\]", "--max_steps 3 --preference.beta 0.2"),
    (r"\$OUT/bench\.jsonl", "docs/results/bench-h100.jsonl"),
    (r"--json \$OUT/", "--json "),
]
# the real-model examples train the tiny model on local data, on the CPU, for 2 steps
REAL_MODEL_CONFIGS = r"--config examples/llama-3\.1-8b-capybara(-lora)?\.yaml"
CPU_STAND_IN = (f" --model_name_or_path {MODEL} --tokenizer_name_or_path {TOKENIZER} --dataset {PREF}"
                " --max_samples 32 --max_steps 2 --bf16 false --attention_backend sdpa --packing_capacity 1024"
                " --max_length 256 --max_prompt_length 128 --warmup_ratio 0")


def shell_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of the shell commands in ``text``'s fenced blocks (python blocks
    and output excluded; ``\\`` continuations joined, ``# comments`` and ``&&`` chains split off)
    and of its inline spans that start with ``prefixpo ``.

    >>> shell_lines("`prefixpo bench`\\n```bash\\nprefixpo plot a   # draw\\nA=1 python -m x \\\\\\n  --y && prefixpo b\\n```\\n"
    ...             "run `prefixpo verify --model m` now")
    [(3, 'prefixpo plot a'), (4, 'A=1 python -m x --y'), (4, 'prefixpo b'), (7, 'prefixpo verify --model m')]
    """
    found: list[tuple[int, str]] = []
    lines = text.splitlines()
    in_block, language, i = False, "", 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.startswith("```"):
            in_block, language = not in_block, line[3:].strip()
        elif in_block and language != "python":
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            for part in line.split(" && "):
                words = [w for w in part.split() if not re.match(r"^[A-Z_]+=", w)]
                if words and words[0] in SHELL_WORDS:
                    found.append((number, part.strip()))
        elif not in_block:
            # a span with arguments is a command line; `prefixpo bench` alone names the command
            found += [(number, span) for span in re.findall(r"`(prefixpo [^`\s]+ [^`]+)`", line)]
        i += 1
    return found


def doc_commands() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}:{number}", command)
            for path in DOCS for number, command in shell_lines(path.read_text())]


def runnable(command: str) -> str:
    """The command with its stand-ins, optional ``[--flag a|b]`` groups taken with their first choice."""
    for pattern, replacement in STAND_INS:
        command = re.sub(pattern, replacement, command)
    command = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), command)
    if re.search(REAL_MODEL_CONFIGS, command):
        command += CPU_STAND_IN
    return command


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory beside the repository's examples/, docs/, tests/ and src/, with a tiny
    two-stage config (``tiny.yaml``), a data config (``data.yaml``) and a finished two-stage run in
    ``runs/my-run``."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("examples", "docs", "tests", "src"):
        (work / name).symlink_to(ROOT / name)
    tiny = {"model_name_or_path": MODEL, "tokenizer_name_or_path": TOKENIZER, "output_dir": "runs/tiny",
            "max_length": 64, "max_samples": 32, "max_steps": 2, "logging_steps": 1, "learning_rate": 1.0e-3,
            "disable_progress_bar": True, "resume_from_checkpoint": "auto",
            "stages": [{"stage": "sft", "dataset": "examples/quickstart/data/sft_train.jsonl"},
                       {"stage": "preference", "dataset": PREF,
                        "eval_dataset": "examples/quickstart/data/pref_eval.jsonl"}]}
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (work / "data.yaml").write_text(yaml.safe_dump({"dataset": PREF, "tokenizer": TOKENIZER, "max_length": 128}))
    done = subprocess.run([PREFIXPO, "train", "--config", "tiny.yaml", "--output_dir", "runs/my-run"], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    """The extraction finds the commands a reader sees (a broken parser would pass everything)."""
    shown = [c for _, c in COMMANDS]
    assert "prefixpo train --config examples/quickstart.yaml" in shown
    assert any(c.startswith("prefixpo prepare --dataset my_pairs.jsonl") for c in shown)
    assert any(c.startswith("prefixpo plot ") for c in shown) and len(shown) > 15


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command(where, command, workdir):
    reasons = [reason for pattern, reason in NOT_RUN_HERE if re.search(pattern, command)]
    if reasons:
        assert len(reasons) == 1, f"{where}: `{command}` matches several rules"
        pytest.skip(f"not run here: {reasons[0]}")
    line = runnable(command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", line], cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{where}: `{line}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, f"{where}: `{line}`:\n{done.stderr[-3000:]}"


def documented_keys() -> dict[str, object]:
    """``key -> default`` of docs/training.md's "Every config key" table."""
    text = (ROOT / "docs" / "training.md").read_text().split("## Every config key", 1)[1]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| `([^`]*)` \|", text, re.M)
    return {key: yaml.safe_load(default) for key, default in rows}


def test_every_config_key_is_documented_with_its_default():
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(TrainConfig)}
    documented = documented_keys()
    assert sorted(documented) == sorted(fields), "docs/training.md's key table and TrainConfig differ"
    wrong = {k: (documented[k], fields[k]) for k in fields if documented[k] != fields[k]}
    assert not wrong, f"documented defaults differ from TrainConfig's (doc, code): {wrong}"


# documented mistakes (docs/training.md "When things go wrong", docs/data.md, the plot docstring):
# (command, exit code, a phrase of its one-line message); run after `workdir` made runs/my-run
DOCUMENTED_ERRORS = [
    ("prefixpo train --config tiny.yaml --lerning_rate 1", 2, "in the command line (--lerning_rate); did you mean"),
    ("prefixpo train --config tiny.yaml --lr_scheduler_type wavy", 2, "`lr_scheduler_type`"),
    ("prefixpo train --config tiny.yaml --output_dir runs/my-run --resume_from_checkpoint null", 2,
     "already holds a run"),
    ("prefixpo train --config tiny.yaml --output_dir runs/empty --resume_from_checkpoint latest", 2,
     "holds no finished checkpoint"),
    ("prefixpo plot runs", 2, "nor stage directories"),
    ("prefixpo prepare --dataset tests/fixtures/data/bad_rows.jsonl", 2, "bad_rows.jsonl: line"),
    ("prefixpo prepare", 2, "no dataset"),
]


@pytest.mark.parametrize("command, code, phrase", DOCUMENTED_ERRORS, ids=[c for c, _, _ in DOCUMENTED_ERRORS])
def test_documented_error(command, code, phrase, workdir):
    done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=120)
    # the message, without the data pipeline's progress bar ("prefixpo: tokenizing: 9/9 [...]")
    err = "\n".join(line for line in done.stderr.strip().splitlines() if not re.search(r"\d+/\d+ \[", line))
    assert done.returncode == code, f"`{command}` exited {done.returncode}:\n{err[-2000:]}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, f"`{command}` did not say one line:\n{err}"
    assert phrase in err, err


def test_column_map_on_the_train_command_line(workdir, tmp_path):
    """The data error suggests --column-map; `prefixpo train` takes it as `prepare` does."""
    data = str(ROOT / "tests" / "fixtures" / "data" / "custom_columns.jsonl")
    base = [PREFIXPO, "train", "--config", "tiny.yaml", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--sft.dataset", data, "--preference.dataset", data, "--preference.eval_dataset", "null"]
    refused = subprocess.run(base, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--column-map chosen=good" in refused.stderr
    maps = ["--column-map", "prompt=question", "--column-map", "chosen=good", "--column-map", "rejected=bad"]
    done = subprocess.run(base + maps, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "custom_columns.jsonl: format explicit, 2 rows read, 2 kept" in done.stderr
