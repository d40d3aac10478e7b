"""Read a dataset into rows: local JSON/JSONL/Parquet/CSV files, ``save_to_disk`` directories, or a
hub name through ``datasets.load_dataset``; then split, shuffle by seed, draw ``fraction`` of the rows
and cap at ``max_samples``.

Every row gets ``_row``, its 1-based number in the source (the line number for JSON lines), so
errors can point at it. JSON is kept as raw text per row (``_json``) and parsed in the tokenization
workers: a malformed line is then one bad row with its line number, and one column may mix text
and chat messages across rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass

import datasets
import pyarrow as pa

from prefixpo.data.config import DataConfig
from prefixpo.data.errors import DataError
from prefixpo.sources import SourceError, check_dataset

JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".csv")


@dataclass
class Source:
    """Rows ready for tokenization: ``_row`` plus either ``_json`` (raw JSON text) or typed columns."""

    rows: datasets.Dataset
    name: str
    columns: list[str]
    fingerprint: str


def local_fingerprint(path: str) -> str:
    """A file's content hash; for a directory, the names, sizes and modification times of its files."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_json_rows(path: str) -> tuple[list[int], list[str]]:
    """Row numbers and raw JSON texts of a JSON-lines file (or of a JSON array file)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                            "Fix the file, or write one JSON object per line (JSON lines), where a bad "
                            "line can be skipped with on_bad_row='skip'") from None
        return list(range(1, len(items) + 1)), [json.dumps(x) for x in items]
    rows, texts = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows.append(i)
            texts.append(line)
    return rows, texts


def json_columns(texts: list[str], peek: int = 200) -> list[str]:
    """Column names seen in the first ``peek`` well-formed rows, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts[:peek]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            seen.update(dict.fromkeys(obj))
    return list(seen)


def _numbered(ds: datasets.Dataset) -> datasets.Dataset:
    return ds.add_column("_row", list(range(1, len(ds) + 1)))


def _load_local(cfg: DataConfig) -> tuple[datasets.Dataset, list[str]]:
    path = cfg.dataset
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: a directory must be written by datasets' save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise DataError(f"{path}: no split {cfg.split!r}; splits are {list(loaded)}. Pass --split")
            loaded = loaded[cfg.split]
        return _numbered(loaded), list(loaded.column_names)
    if cfg.split != "train":
        raise DataError(f"{path}: a single file has one split, 'train' (got split={cfg.split!r})")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in JSON_SUFFIXES:
        rows, texts = read_json_rows(path)
        return datasets.Dataset.from_dict({"_row": rows, "_json": texts}), json_columns(texts)
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .json, .jsonl, .parquet or .csv, "
                        "or a save_to_disk directory")
    return _numbered(datasets.Dataset(pa.Table.from_batches(table.to_batches(), table.schema))), table.column_names


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    try:  # a missing local file, or a name the Hub does not have, fails here, never tried on the Hub
        check_dataset(cfg.dataset, "dataset")
    except SourceError as e:
        raise DataError(str(e)) from None
    try:
        loaded = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except Exception as e:
        raise DataError(f"{cfg.dataset!r} is not a local file or directory, and loading it with "
                        f"datasets.load_dataset failed: {type(e).__name__}: {e}") from None
    return loaded


def fraction_count(rows: int, fraction: float) -> int:
    """How many of ``rows`` rows a fraction keeps: ``int(fraction * rows)``, at least one.

    >>> fraction_count(10, 0.25), fraction_count(100, 0.29), fraction_count(3, 0.1), fraction_count(0, 0.5)
    (2, 29, 1, 0)
    """
    return min(rows, max(1, int(round(fraction * rows, 6))))  # round: 0.29 * 100 is 28.999...


def drawn_rows(rows: int, fraction: float, seed: int) -> list[int]:
    """Indices of the rows a fraction keeps, drawn without replacement by ``seed``, in source order.

    >>> drawn_rows(10, 0.3, seed=0) == drawn_rows(10, 0.3, seed=0), len(drawn_rows(10, 0.3, seed=0))
    (True, 3)
    """
    return sorted(random.Random(seed).sample(range(rows), fraction_count(rows, fraction)))


def load_source(cfg: DataConfig, fingerprint: str | None = None) -> Source:
    """Load, number, shuffle (if ``cfg.shuffle``, by ``cfg.seed``), draw and cap the rows of a dataset."""
    if os.path.exists(cfg.dataset):
        rows, columns = _load_local(cfg)
        fingerprint = fingerprint or local_fingerprint(cfg.dataset)
    else:
        loaded = _load_hub(cfg)
        rows, columns = _numbered(loaded), list(loaded.column_names)
        fingerprint = loaded._fingerprint
    if cfg.shuffle:
        rows = rows.shuffle(seed=cfg.seed)
    if cfg.fraction is not None and cfg.fraction < 1:
        rows = rows.select(drawn_rows(len(rows), cfg.fraction, cfg.seed))
    if cfg.max_samples is not None and cfg.max_samples < len(rows):
        rows = rows.select(range(cfg.max_samples))
    return Source(rows, cfg.dataset, columns, fingerprint)
