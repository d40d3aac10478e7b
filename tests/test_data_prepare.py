"""``prefixpo prepare``: statistics on success (exit 0), a clear message and exit 2 on bad input."""

from __future__ import annotations

import json

import datasets
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.cli import main

datasets.disable_progress_bars()


def run(argv):
    """``prefixpo prepare ARGV`` through the command's own entry point (as the executable calls it)."""
    return main(["prepare", *argv])


def saved_tokenizer(tmp_path, style="chatml"):
    path = tmp_path / f"tok-{style}"
    make_tokenizer(style).save_pretrained(path)
    return str(path)


def test_prepare_prints_statistics(tmp_path, capsys):
    tok = saved_tokenizer(tmp_path)
    argv = ["--dataset", str(FIXTURES / "ranked_completions.jsonl"), "--tokenizer", tok, "--cache-dir",
            str(tmp_path / "cache")]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "format ranked, 2 rows read, 2 kept, 0 bad (skipped)" in out and "tokenized in" in out
    assert "sharing saving" in out and "packing capacity     4096" in out and "groups per row" in out
    assert run(argv + ["--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cache_hit"] and stats["rows_kept"] == 2 and stats["stats"]["suggested_capacity"] % 128 == 0
    s = stats["stats"]
    assert s["sharing_saving"] == s["num_separate_tokens"] / s["num_tokens"] > 1


def test_prepare_bad_input_exits_2_with_message(tmp_path, capsys):
    tok = saved_tokenizer(tmp_path)
    assert run(["--dataset", str(FIXTURES / "bad_rows.jsonl"), "--tokenizer", tok, "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "bad_rows.jsonl: line 2, column prompt: prompt is empty" in err and "Traceback" not in err
    assert run(["--dataset", str(FIXTURES / "bad_rows.jsonl"), "--tokenizer", tok, "--no-cache",
                "--on-bad-row", "skip"]) == 0
    assert "7 bad (skipped)" in capsys.readouterr().out
    assert run(["--dataset", str(tmp_path / "missing.jsonl"), "--tokenizer", tok]) == 2
    assert "--dataset: no local file" in capsys.readouterr().err
    assert run(["--dataset", str(FIXTURES / "explicit_strings.jsonl"), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert f"--tokenizer: no local directory {tmp_path / 'nope'} (and it is not a Hub name)" in capsys.readouterr().err


def test_prepare_from_yaml_config_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"dataset: {FIXTURES / 'custom_columns.jsonl'}\ntokenizer: {saved_tokenizer(tmp_path)}\n"
                   "column_map: {{prompt: question, chosen: good, rejected: bad}}\nmax_length: 512\nuse_cache: false\n"
                   .replace("{{", "{").replace("}}", "}"))
    assert run(["--config", str(cfg), "--max-samples", "1"]) == 0
    assert "1 rows read, 1 kept" in capsys.readouterr().out
    cfg.write_text(f"dataset: {FIXTURES / 'custom_columns.jsonl'}\nmax_lenght: 512\n")
    assert run(["--config", str(cfg)]) == 2
    assert "unknown data config key 'max_lenght'; did you mean 'max_length'?" in capsys.readouterr().err


def test_prepare_without_tokenizer_checks_rows(capsys):
    assert run(["--dataset", str(FIXTURES / "implicit_hh.jsonl")]) == 0
    assert "rows checked only" in capsys.readouterr().out


def test_cli_has_prepare():
    from prefixpo.cli import COMMANDS
    assert COMMANDS["prepare"][0] == "prefixpo.prepare"


def test_only_prefixpo_bars_between_its_lines(tmp_path):
    """Through the executable, tokenizing into an empty cache: prefixpo's own tokenizing bar, none of
    datasets' housekeeping bars (flattening, saving, loading the cache)."""
    import shutil
    import subprocess

    from conftest import ROOT

    quick = ROOT / "examples" / "quickstart"
    cmd = [shutil.which("prefixpo") or "prefixpo", "prepare", "--dataset", str(quick / "data" / "pref_train.jsonl"),
           "--tokenizer", str(quick / "tokenizer"), "--cache-dir", str(tmp_path / "cache")]
    for _ in range(2):  # a cache miss, then a hit
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        for bar in ("Flattening the indices", "Saving the dataset", "Loading dataset"):
            assert bar not in done.stderr
    assert "prefixpo: tokenizing" not in done.stderr  # the hit tokenizes nothing


def test_ctrl_c_stops_a_command_in_one_line(tmp_path):
    """Ctrl-C while a command reads its data (before training, which saves on SIGINT itself): the
    ``prefixpo`` executable prints one line and exits 130, without a traceback. The data is a file
    large enough that ``prepare`` is still tokenizing when the interrupt comes."""
    import os
    import shutil
    import signal
    import subprocess

    rows = tmp_path / "big.jsonl"
    text = " ".join(["word"] * 200)
    rows.write_text("".join(json.dumps({"prompt": f"{i} {text}", "chosen": text, "rejected": f"no {text}"}) + "\n"
                            for i in range(50_000)))
    tok = saved_tokenizer(tmp_path)
    exe = shutil.which("prefixpo")
    assert exe, "the package's `prefixpo` executable is installed"
    proc = subprocess.Popen([exe, "prepare", "--dataset", str(rows), "--tokenizer", tok, "--cache-dir",
                             str(tmp_path / "cache")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    while not any("tokenizing" in line for line in seen[-1:]):  # the command is running: interrupt it now
        seen.append(proc.stderr.readline())
        assert seen[-1] or proc.poll() is None, "".join(seen)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "prefixpo prepare: interrupted", err[-2000:]
