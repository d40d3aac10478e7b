"""Preference datasets in, tokenized groups out (issue 5).

    >>> from prefixpo.data import DataConfig, load_groups
    >>> groups, report = load_groups(DataConfig("pairs.jsonl", max_length=1024), tokenizer)  # doctest: +SKIP

Modules: ``config`` (the typed ``DataConfig``), ``loading`` (files, save_to_disk dirs, hub names),
``formats`` (rows -> ``Example``, one parser per generic format), ``schemas`` (public dataset
schemas; ``parse_row`` over every format and schema), ``merge`` (rows that share a prompt),
``tokenize`` (chat templates, plain text, truncation), ``pipeline`` (``load_groups``, workers, cache,
report), ``mixture`` (several datasets), ``stats`` (lengths and sharing savings), ``errors``
(``DataError``, ``BadRow``).
"""

from prefixpo.data.config import DataConfig
from prefixpo.data.errors import BadRow, DataError
from prefixpo.data.formats import Example, resolve_columns
from prefixpo.data.pipeline import DataReport, TokenizedGroups, load_groups
from prefixpo.data.schemas import parse_row
from prefixpo.data.stats import GroupStats, group_stats

__all__ = ["BadRow", "DataConfig", "DataError", "DataReport", "Example", "GroupStats", "TokenizedGroups",
           "group_stats", "load_groups", "parse_row", "resolve_columns"]
