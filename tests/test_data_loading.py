"""Local files of every kind, save_to_disk directories, splits, sampling, shuffling, workers and the cache."""

from __future__ import annotations

import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.data import DataConfig, DataError, load_groups

datasets.disable_progress_bars()
ROWS = [json.loads(line) for line in (FIXTURES / "explicit_strings.jsonl").read_text().splitlines()]


def groups_of(path, **options):
    groups, report = load_groups(DataConfig(str(path), cache_dir=None, **options), make_tokenizer())
    return list(groups), report


@pytest.fixture(scope="module")
def reference():
    return groups_of(FIXTURES / "explicit_strings.jsonl")[0]


def test_parquet_csv_json_array_and_save_to_disk_give_the_same_groups(tmp_path, reference):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w") as f:
        f.write("prompt,chosen,rejected\n" + "".join(",".join(json.dumps(r[k]) for k in r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    for path, split in [("d.parquet", "train"), ("d.csv", "train"), ("d.json", "train"), ("disk", "train"),
                        ("dict", "test")]:
        assert groups_of(tmp_path / path, split=split)[0] == reference, path


def test_split_errors(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"no split 'train'; splits are \['test'\]"):
        groups_of(tmp_path / "dict")
    with pytest.raises(DataError, match="a single file has one split"):
        groups_of(FIXTURES / "explicit_strings.jsonl", split="test")


def test_max_samples_and_seeded_shuffle(reference):
    assert groups_of(FIXTURES / "explicit_strings.jsonl", max_samples=2)[0] == reference[:2]
    a = groups_of(FIXTURES / "explicit_strings.jsonl", shuffle=True, seed=3)[0]
    assert a == groups_of(FIXTURES / "explicit_strings.jsonl", shuffle=True, seed=3)[0]
    assert sorted(map(repr, a)) == sorted(map(repr, reference))
    assert any(groups_of(FIXTURES / "explicit_strings.jsonl", shuffle=True, seed=s)[0] != reference for s in range(5))


def test_workers_give_the_same_groups(reference):
    assert groups_of(FIXTURES / "explicit_strings.jsonl", num_proc=2)[0] == reference


def test_unknown_hub_name_or_file_type(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-dataset-xyz is not in the local Hugging Face cache and offline mode"):
        groups_of("no-such-owner-xyz/no-such-dataset-xyz")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '.txt'"):
        groups_of(tmp_path / "d.txt")


def test_json_array_syntax_error_names_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]')
    with pytest.raises(DataError, match=r"d.json: not valid JSON at line 3, column 11"):
        groups_of(tmp_path / "d.json")


def test_second_run_hits_the_cache_and_changes_miss_it(tmp_path, reference):
    path = tmp_path / "d.jsonl"
    path.write_text((FIXTURES / "explicit_strings.jsonl").read_text())
    cfg = DataConfig(str(path), cache_dir=str(tmp_path / "cache"))
    first, r1 = load_groups(cfg, make_tokenizer())
    second, r2 = load_groups(cfg, make_tokenizer())
    assert not r1.cache_hit and r2.cache_hit and r1.cache_path == r2.cache_path
    assert list(second) == list(first) == reference and r2.rows_kept == r1.rows_kept
    _, r3 = load_groups(DataConfig(str(path), cache_dir=str(tmp_path / "cache"), max_length=80), make_tokenizer())
    _, r4 = load_groups(cfg, make_tokenizer("llama3"))
    path.write_text(path.read_text() + json.dumps(ROWS[0] | {"prompt": "New?"}) + "\n")
    _, r5 = load_groups(cfg, make_tokenizer())
    assert not (r3.cache_hit or r4.cache_hit or r5.cache_hit) and r5.rows_kept == 4


def test_a_cache_entry_another_process_wrote_first_stays_for_its_readers(tmp_path, reference):
    """Two processes (ranks) that miss the cache together both write it: the second finds the
    first's complete entry in place and drops its own copy, so the files the first is reading stay
    (deleting them under a reader failed a 2-rank run). An entry the cache refuses (no rows kept,
    from an older version) is replaced."""
    from prefixpo.data import pipeline

    path = tmp_path / "d.jsonl"
    path.write_text((FIXTURES / "explicit_strings.jsonl").read_text())
    cfg = DataConfig(str(path), cache_dir=str(tmp_path / "cache"))
    first, report = load_groups(cfg, make_tokenizer())
    entry = report.cache_path
    arrow = next((tmp_path / "cache").rglob("*.arrow"))
    inode = arrow.stat().st_ino
    pipeline._save_cache(entry, datasets.Dataset.from_dict({"x": [1]}), report)  # the second writer
    assert arrow.stat().st_ino == inode and list(first) == reference
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.rsplit("/", 1)[1]]  # its copy dropped
    second, again = load_groups(cfg, make_tokenizer())
    assert again.cache_hit and list(second) == reference

    stored = tmp_path / "cache" / entry.rsplit("/", 1)[1]
    rows_kept = report.rows_kept
    report.rows_kept = 0
    (stored / "report.json").write_text(report.to_json())
    third, fresh = load_groups(cfg, make_tokenizer())  # refused: read again and written over
    assert not fresh.cache_hit and list(third) == reference and pipeline._entry_report(entry) is not None
    report.rows_kept = rows_kept
    for broken in ("groups", "report.json"):  # an entry missing a part, or with an unreadable report
        shutil.rmtree(stored / broken) if broken == "groups" else (stored / broken).write_text("{")
        again, refused = load_groups(cfg, make_tokenizer())
        assert not refused.cache_hit and list(again) == reference and pipeline._entry_report(entry) is not None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [stored.name]  # no copies left over


def test_check_only_without_tokenizer():
    groups, report = load_groups(DataConfig(str(FIXTURES / "bad_rows.jsonl"), on_bad_row="skip"), None)
    assert groups is None and report.rows_kept == 2 and len(report.bad_rows) == 7
