"""Dataset mixtures: several datasets, each with its own options, loaded as one list of groups.

A training config's ``dataset`` (and ``eval_dataset``) is a string -- one dataset -- or a list
(or one mapping: one dataset with options).
Each item of the list is a string (a file, a ``save_to_disk`` directory or a hub name: all its
rows, the default options) or a mapping with ``path`` and per-dataset keys. The run's data keys
(``dataset_split``, ``dataset_format``, ``max_samples``, ``max_length``, ``on_bad_row``, the
``data:`` block, ...) are the defaults of every dataset; a per-dataset key overrides them for that
dataset only::

    dataset:
      - data/hh.jsonl                                  # every row, the defaults
      - path: data/qa.jsonl                            # its own column names
        column_map: {prompt: question, chosen: good, rejected: bad}
        weight: 0.5                                    # half of its rows, drawn by `seed`
      - {path: stanfordnlp/SHP, max_samples: 1000}     # its first 1000 rows

``weight`` is the fraction of that dataset's rows to use, in (0, 1] (as in TRL's
``dataset_mixture``): ``max(1, int(weight * rows))`` rows drawn without replacement by ``seed``.
``max_samples`` is a row count (the first rows, or the first after ``shuffle``); one entry takes
one or the other. A ``max_samples`` inherited from the run caps every dataset, after its draw.

Worked example: the defaults below come from the run; the second dataset overrides two of them.

    >>> defaults = {"split": "train", "format": "auto", "max_length": 512, "seed": 0}
    >>> configs = resolve_sources(["hh.jsonl", {"path": "qa.jsonl", "weight": 0.5,
    ...                            "column_map": {"prompt": "question"}}], defaults)
    >>> [(c.dataset, c.fraction, c.column_map, c.max_length) for c in configs]
    [('hh.jsonl', None, {}, 512), ('qa.jsonl', 0.5, {'prompt': 'question'}, 512)]
    >>> resolve_sources([{"path": "qa.jsonl", "colum_map": {}}], defaults)
    Traceback (most recent call last):
    ...
    prefixpo.data.mixture.MixtureError: config key `dataset[0].colum_map`: unknown per-dataset key; did you mean `column_map`?

``load_mixture`` loads each dataset through ``load_groups`` (its own format detection, cache and
bad-row report) and concatenates the groups in order; the trainer shuffles the groups of every
epoch by ``seed``, so the datasets are interleaved in training. ``Mixture.summary`` is each
dataset's report plus one line of groups per dataset::

    mixture: 2 datasets, 200 groups: hh.jsonl 120 (60%), qa.jsonl 80 (40%)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from prefixpo.data.config import DataConfig
from prefixpo.data.errors import BadDataValue, DataError
from prefixpo.data.pipeline import DataReport, load_groups
from prefixpo.layout import Group

RENAMED = {"path": "dataset", "weight": "fraction"}  # per-dataset key -> DataConfig field
BACK = {v: k for k, v in RENAMED.items()}
RUN_WIDE = {"num_proc": "dataset_num_proc", "cache_dir": "data.cache_dir", "use_cache": "data.use_cache"}


class MixtureError(DataError):
    """A bad ``dataset`` / ``eval_dataset`` value; ``key`` is the key path (``dataset[1].weight``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key `{key}`: {message}")
        self.key = key


# --- checks of one per-dataset value -------------------------------------------------------------

def _name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def number(value: Any) -> float | None:
    """``value`` as a float (YAML reads ``1e-1`` as a string), or None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


# the keys a dataset entry may set: `path`, `weight` and DataConfig's own per-dataset fields;
# DataConfig checks their values, the mixture names the key path
SOURCE_KEYS = ("path", "weight", *(f.name for f in fields(DataConfig)
                                   if f.name not in {*RENAMED.values(), *RUN_WIDE}))


# --- a dataset value -> per-dataset DataConfigs --------------------------------------------------

def _unknown(key: str) -> str:
    if key in RUN_WIDE:
        return f"applies to every dataset at once: set `{RUN_WIDE[key]}` instead"
    if key in RENAMED.values():
        return f"is called `{next(k for k, v in RENAMED.items() if v == key)}` in a dataset entry"
    close = difflib.get_close_matches(key, SOURCE_KEYS, n=1)
    return "unknown per-dataset key" + (f"; did you mean `{close[0]}`?" if close
                                        else f"; known keys: {', '.join(SOURCE_KEYS)}")


def check_entry(item: Any, where: str) -> dict[str, Any]:
    """One list item as a mapping with ``path``; raises ``MixtureError`` naming the bad key."""
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise MixtureError(where, f"must be a path or hub name, or a mapping with `path`, got {_name(item)}")
    for key in item:
        if key not in SOURCE_KEYS:
            raise MixtureError(f"{where}.{key}", _unknown(str(key)))
    if "path" not in item:
        raise MixtureError(where, "a dataset mapping needs `path` (a data file, a save_to_disk directory or "
                                  f"a hub name); it has {', '.join(map(str, item)) or 'no keys'}")
    if not isinstance(item["path"], str) or not item["path"]:
        raise MixtureError(f"{where}.path", f"must be a non-empty string, got {_name(item['path'])}")
    w = number(item.get("weight", 1))
    if w is None or not 0 < w <= 1:
        raise MixtureError(f"{where}.weight", f"must be the fraction of the dataset's rows to use, in (0, 1], got "
                                              f"{item['weight']!r} (for a row count use max_samples)")
    if "weight" in item and "max_samples" in item:
        raise MixtureError(where, "give weight (the fraction of its rows to use) or max_samples (a row "
                                  "count), not both")
    return item


def check_sources(value: Any, key: str = "dataset") -> list[dict[str, Any]]:
    """The entries of a ``dataset`` value (a string, one mapping, or a list), each a mapping with ``path``.

    >>> check_sources("a.jsonl"), check_sources(["a.jsonl", {"path": "b.jsonl", "weight": 0.5}])
    ([{'path': 'a.jsonl'}], [{'path': 'a.jsonl'}, {'path': 'b.jsonl', 'weight': 0.5}])
    """
    if isinstance(value, str):
        if not value:
            raise MixtureError(key, "is empty; give a data file, a save_to_disk directory or a hub name")
        return [{"path": value}]
    if isinstance(value, dict):  # one dataset with options
        return [check_entry(value, key)]
    if not isinstance(value, list):
        raise MixtureError(key, "must be a path or hub name, a mapping with `path`, or a list of them, "
                                f"got {_name(value)}")
    if not value:
        raise MixtureError(key, "is an empty list; give at least one dataset")
    return [check_entry(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _data_config(entry: dict[str, Any], defaults: dict[str, Any], where: str) -> DataConfig:
    values = {**defaults, **{RENAMED.get(k, k): v for k, v in entry.items()}}
    for name in ("fraction", "min_score_ratio"):
        if values.get(name) is not None:
            values[name] = number(values[name])
    try:
        return DataConfig.from_dict(values)
    except DataError as err:  # DataConfig names the field it refused: name it as the entry does
        name = err.field if isinstance(err, BadDataValue) else None
        key = f"{where}.{BACK.get(name, name)}" if name and name in {*entry, *BACK} else where
        raise MixtureError(key, str(err)) from None


def resolve_sources(value: Any, defaults: dict[str, Any], key: str = "dataset") -> list[DataConfig]:
    """The ``DataConfig`` of each dataset of ``value``: ``defaults`` (DataConfig keys) overridden by
    the entry's own keys. Raises ``MixtureError`` (a ``DataError``) naming the key path."""
    entries = check_sources(value, key)
    where = [f"{key}[{i}]" if isinstance(value, list) else key for i in range(len(entries))]
    return [_data_config(e, defaults, w) for e, w in zip(entries, where, strict=True)]


# --- loading -------------------------------------------------------------------------------------

def source_labels(configs: list[DataConfig]) -> list[str]:
    """A short name per dataset: its path, with subset and split where not the defaults, and its
    index where two are otherwise the same.

    >>> source_labels([DataConfig("a.jsonl"), DataConfig("b", split="test"), DataConfig("a.jsonl")])
    ['a.jsonl #0', 'b [test]', 'a.jsonl #2']
    """
    names = [c.dataset + (f" ({c.subset})" if c.subset else "") + (f" [{c.split}]" if c.split != "train" else "")
             for c in configs]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class Mixture:
    """The groups of every dataset, in order, with each dataset's report and group count."""

    groups: list[Group]
    labels: list[str]
    reports: list[DataReport]
    counts: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def line(self) -> str:
        """``mixture: 2 datasets, 200 groups: hh.jsonl 120 (60%), qa.jsonl 80 (40%)``"""
        parts = [f"{label} {n} ({100 * n / max(self.total, 1):.3g}%)" for label, n in zip(self.labels, self.counts,
                                                                                            strict=True)]
        return f"mixture: {len(self.counts)} datasets, {self.total} groups: {', '.join(parts)}"

    def summary(self, examples: int = 5) -> str:
        """Each dataset's report summary; with more than one dataset, the mixture line after them."""
        lines = [r.summary(examples) for r in self.reports]
        return "\n".join(lines + ([self.line()] if len(self.reports) > 1 else []))


def load_mixture(configs: list[DataConfig], tokenizer: Any,
                 on_report: Callable[[str], None] | None = None) -> Mixture:
    """Load every dataset through ``load_groups`` and concatenate their groups in order.

    ``on_report`` gets each dataset's report summary as soon as it has loaded (so a later failure
    still shows the earlier reports). ``tokenizer=None`` only checks the rows (no groups).
    """
    groups: list[Group] = []
    reports, counts = [], []
    for cfg in configs:
        loaded, report = load_groups(cfg, tokenizer)
        if on_report is not None:
            on_report(report.summary())
        if loaded is not None:
            groups.extend(loaded)
        reports.append(report)
        counts.append(report.rows_kept)
    return Mixture(groups, source_labels(configs), reports, counts)
