"""The typed, validated data config: one dataclass, loadable from a dict (YAML) or the CLI."""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prefixpo.data.errors import BadDataValue, UnknownDataKey

BASE_FORMATS = ("auto", "explicit", "implicit", "ranked", "pairwise", "sft")
SCHEMA_FORMATS = ("ultrafeedback_binarized", "capybara_dpo", "orca_dpo_pairs", "shp", "stack_exchange",
                  "ultrafeedback", "nectar", "summarize_from_feedback", "pku_saferlhf")  # data/schemas.py
FORMATS = BASE_FORMATS + SCHEMA_FORMATS
TRUNCATION = ("keep_end", "keep_start", "drop", "error")
ON_BAD_ROW = ("error", "skip")


def default_cache_dir() -> str:
    root = os.environ.get("PREFIXPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prefixpo")
    return os.path.join(root, "data")


NOT_THE_DATA = ("num_proc", "cache_dir", "use_cache")  # keys that change how the data is read, not what it is


@dataclass
class DataConfig:
    """Where the data is, how to read it and how to tokenize it.

    - ``dataset``: a hub name, a ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a directory
      written by ``save_to_disk``. ``split``/``subset`` select a split and a hub config name.
    - ``format``: one of ``FORMATS`` (``auto`` detects it from the columns); ``column_map`` maps a
      canonical column name to the dataset's (``{"chosen": "good"}``); ``role_map`` renames roles.
    - ``fraction``: use this fraction of the rows, in (0, 1]: ``max(1, int(fraction * rows))`` rows
      drawn by ``seed`` (before ``max_samples``, which then caps the draw). A mixture's ``weight``.
    - ``max_length`` bounds prompt + longest response, ``max_prompt_length`` the prompt.
      ``truncation``: ``keep_end`` (keep the end of the prompt), ``keep_start``, ``drop`` (drop long
      rows, counted) or ``error`` (long rows are bad rows). Responses always keep their start.
    - ``min_score_ratio``: pairwise rows whose higher score is less than this times the lower are
      filtered out (counted). ``on_bad_row``: ``error`` stops at the first bad row, ``skip`` skips
      and reports every one.
    - ``use_chat_template``: ``None`` (as TRL) templates chat message lists and keeps strings raw
      text; ``True`` templates strings too; ``False`` nothing.
    - ``merge_prompts``: rows whose prompts tokenize the same and whose pairs are fixed by the data
      become one group with all their responses and exactly their pairs (``data/merge.py``).
    - ``preference_column``: which id column names the preferred response in PKU-SafeRLHF style
      data (default ``better_response_id``; e.g. ``safer_response_id``).
    - ``pairs``: the responses are compared in pairs (preference training), so a row whose
      responses truncation makes identical is filtered; false for SFT, which trains each group's
      first response.
    """

    dataset: str
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    column_map: dict[str, str] = field(default_factory=dict)
    role_map: dict[str, str] = field(default_factory=dict)
    max_samples: int | None = None
    fraction: float | None = None
    shuffle: bool = False
    seed: int = 0
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: str = "keep_end"
    min_score_ratio: float | None = None
    on_bad_row: str = "error"
    use_chat_template: bool | None = None
    num_proc: int = 1
    cache_dir: str | None = field(default_factory=default_cache_dir)
    use_cache: bool = True
    merge_prompts: bool = True
    preference_column: str | None = None
    pairs: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> BadDataValue:
            return BadDataValue(name, f"{name}={getattr(self, name)!r} {message}")

        if not self.dataset or not isinstance(self.dataset, str):
            raise bad("dataset", "is not a hub name, a data file or a save_to_disk directory")
        for name, allowed in (("format", FORMATS), ("truncation", TRUNCATION), ("on_bad_row", ON_BAD_ROW)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"is not one of {', '.join(allowed)}")
        for name in ("max_samples", "max_length", "max_prompt_length", "num_proc"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(name, "must be a positive integer")
        for name, optional in (("shuffle", False), ("use_cache", False), ("use_chat_template", True),
                               ("merge_prompts", False)):
            if not isinstance(getattr(self, name), bool) and not (optional and getattr(self, name) is None):
                raise bad(name, "must be true or false" + (" (or null)" if optional else ""))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0 < self.fraction <= 1):
            raise bad("fraction", "must be a number in (0, 1]")
        if self.max_length and self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise bad("max_prompt_length", f"must be less than max_length={self.max_length}, to leave room for "
                      "the responses")
        if self.min_score_ratio is not None and (isinstance(self.min_score_ratio, bool) or not
                                                 isinstance(self.min_score_ratio, (int, float)) or
                                                 self.min_score_ratio < 1):
            raise bad("min_score_ratio", "must be a number, at least 1")
        for name in ("column_map", "role_map"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
                raise bad(name, "must map names to names ({prompt: question})")
        for name in ("split", "subset", "preference_column"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (name != "split" and value is None):
                raise bad(name, "must be a non-empty string")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a dict (a parsed YAML file); unknown keys are an error with a suggestion.

        >>> DataConfig.from_dict({"dataset": "d.jsonl", "max_length": 512}).max_length
        512
        """
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise UnknownDataKey(f"unknown data config key {key!r}"
                                + (f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {known}"))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_options(self) -> dict[str, Any]:
        """The options that change the tokenized output (not the worker count or cache place)."""
        values = self.to_dict()
        for key in NOT_THE_DATA:
            values.pop(key)
        return values
