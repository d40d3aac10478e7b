"""Opt-in timing: 100k synthetic rows prepared with 2 workers, then a second run from the cache.

    PREFIXPO_DATA_BENCH=1 python -m pytest tests/test_data_speed.py -q -s

Prints one JSON line with both timings (recorded in docs/data.md).
"""

from __future__ import annotations

import json
import os
import random
import time

import datasets
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.data import DataConfig, load_groups

ROWS = int(os.environ.get("PREFIXPO_DATA_BENCH_ROWS", "100000"))


@pytest.mark.skipif(not os.environ.get("PREFIXPO_DATA_BENCH"), reason="set PREFIXPO_DATA_BENCH=1 to time 100k rows")
def test_100k_rows_under_a_minute(tmp_path):
    datasets.disable_progress_bars()
    words = (FIXTURES / "corpus.txt").read_text().split()
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    path = tmp_path / "synthetic.jsonl"
    with open(path, "w") as f:
        for _ in range(ROWS):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(20, 120)}],
                                "chosen": [{"role": "assistant", "content": text(10, 80)}],
                                "rejected": [{"role": "assistant", "content": text(10, 80)}]}) + "\n")
    cfg = DataConfig(str(path), num_proc=2, max_length=1024, cache_dir=str(tmp_path / "cache"))
    tok = make_tokenizer("llama3")
    start = time.perf_counter()
    groups, report = load_groups(cfg, tok)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again, report2 = load_groups(cfg, make_tokenizer("llama3"))
    second = time.perf_counter() - start
    print(json.dumps({"rows": ROWS, "kept": report.rows_kept, "first_run_s": round(first, 2),
                      "cached_run_s": round(second, 2), "cache_hit": report2.cache_hit, "num_proc": 2}))
    assert report.rows_kept == ROWS == report2.rows_kept and report2.cache_hit and not report.cache_hit
    assert again[ROWS - 1] == groups[ROWS - 1]
    assert first < 60
