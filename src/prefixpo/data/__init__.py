"""Preference datasets in, tokenized groups out (issue 5).

    >>> from prefixpo.data import DataConfig, load_groups
    >>> groups, report = load_groups(DataConfig("pairs.jsonl", max_length=1024), tokenizer)  # doctest: +SKIP

Modules: ``config`` (the typed ``DataConfig``), ``loading`` (files, save_to_disk dirs, hub names),
``formats`` (rows -> ``Example``), ``tokenize`` (chat templates, plain text, truncation),
``pipeline`` (``load_groups``, workers, cache, report), ``stats`` (lengths and sharing savings),
``errors`` (``DataError``, ``BadRow``).
"""

from prefixpo.data.config import DataConfig
from prefixpo.data.errors import BadRow, DataError
from prefixpo.data.formats import Example, parse_row, resolve_columns
from prefixpo.data.pipeline import DataReport, TokenizedGroups, load_groups
from prefixpo.data.stats import GroupStats, group_stats

__all__ = ["BadRow", "DataConfig", "DataError", "DataReport", "Example", "GroupStats", "TokenizedGroups",
           "group_stats", "load_groups", "parse_row", "resolve_columns"]
