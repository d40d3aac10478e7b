"""The benchmark profiles ship with the package: loaded with no path, by the library and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from prefixpo.bench.profiles import DEFAULT_PROFILES, load_profiles, sample_lengths

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback"]


def test_default_profiles_are_the_packaged_file(monkeypatch):
    monkeypatch.delenv("PREFIXPO_BENCH_PROFILES", raising=False)
    packaged = resources.files("prefixpo.bench") / "profiles.json"
    assert packaged.is_file() and Path(str(packaged)) == DEFAULT_PROFILES
    profiles = load_profiles()
    assert sorted(profiles["profiles"]) == NAMES
    assert {"llama-1b", "qwen-0.5b", "llama-8b"} <= set(profiles["models"])
    assert profiles == json.loads(packaged.read_text())


def test_an_explicit_path_or_the_environment_overrides(tmp_path, monkeypatch):
    own = tmp_path / "profiles.json"
    own.write_text(json.dumps({"profiles": {"mine": {"median_overall": 100, "ratio": 1.0,
                                                     "max_prompt": 64, "max_length": 128}}}))
    assert list(load_profiles(own)["profiles"]) == ["mine"]
    monkeypatch.setenv("PREFIXPO_BENCH_PROFILES", str(own))
    assert list(load_profiles()["profiles"]) == ["mine"]
    assert sorted(load_profiles(DEFAULT_PROFILES)["profiles"]) == NAMES


def test_sampled_lengths_respect_the_profile_limits():
    profile = load_profiles(DEFAULT_PROFILES)["profiles"]["capybara"]
    for prompt, responses in sample_lengths(profile, 200, seed=0):
        assert 8 <= prompt <= profile["max_prompt"]
        assert all(1 <= r and prompt + r <= profile["max_length"] for r in responses)


def test_pyproject_ships_the_profiles_as_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"prefixpo.bench" = ["profiles.json"]' in section


def bench_command(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``prefixpo bench ARGS`` through the installed executable (this checkout's code first on the
    path), run from an empty directory so no file beside the repository can be found."""
    exe = shutil.which("prefixpo")
    command = [exe] if exe else [sys.executable, "-m", "prefixpo.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PREFIXPO_BENCH_PROFILES"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([*command, "bench", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_bench_help_runs(tmp_path):
    done = bench_command(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "--profiles" in done.stdout and "shipped with prefixpo" in done.stdout


def test_bench_loads_the_packaged_profiles(tmp_path):
    done = bench_command(tmp_path, "--device", "cpu", "--profile", "no-such-profile")
    assert done.returncode != 0
    assert "the profiles are: " + ", ".join(NAMES) in done.stderr.replace("\n", " ")


def test_bench_refuses_a_model_too_big_for_the_cpu_at_once(tmp_path):
    """``prefixpo bench`` on the CPU with an 8B model: one line saying how much memory it would
    need against what the machine has, and the small model to pass, before anything is allocated
    (without the check, llama-1b alone was killed for memory after minutes on a 24 GiB machine)."""
    done = bench_command(tmp_path, "--device", "cpu", "--model", "llama-8b")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("prefixpo bench: error: llama-8b has 8.0B parameters: on the CPU its benchmark needs "
                           "about 150 GiB") and line.endswith("--model examples/configs/tiny-llama.json)"), line
