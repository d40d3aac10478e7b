"""The repository stands alone: no tracked file points outside it to a sibling folder or to design
and peer notes kept elsewhere (they live in docs/design.md and docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["src", "tests", "docs", "scripts", "examples", "README.md", "pyproject.toml", ".ci"]
RAW_OUTPUT = "docs/results/"  # logs recorded as the runs printed them, not instructions
# spelled in pieces so that this file does not match itself
FORBIDDEN = ["../" + "shared", "shared" + "/", "." + "carry", "DESIGN" + ".md", "PEERS" + ".md"]


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *CHECKED], cwd=ROOT, capture_output=True,
                             check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.split("\0") if p and not p.startswith(RAW_OUTPUT)]


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_files()
    assert "src/prefixpo/bench/profiles.py" in files
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for lineno, line in enumerate(text.splitlines(), 1):
            found += [f"{name}:{lineno}: {word!r}" for word in FORBIDDEN if word in line]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_the_checked_words_would_be_found():
    line = "see " + "DESIGN" + ".md section 2 and ../" + "shared" + "/bench_profiles.json"
    assert [w for w in FORBIDDEN if w in line] == ["../" + "shared", "shared" + "/", "DESIGN" + ".md"]
    assert not [w for w in FORBIDDEN if w in "docs/design.md section 2, a prefix-shared layout"]
