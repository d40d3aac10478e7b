"""``prefixpo prepare``: check and tokenize a dataset, then print its statistics.

    prefixpo prepare --dataset pairs.jsonl --tokenizer ./my-tokenizer --max-length 2048 --on-bad-row skip
    prefixpo prepare --config data.yaml --num-proc 4

Keys of ``--config`` (YAML) are the ``DataConfig`` fields plus ``tokenizer``; command-line flags
override them. Exit 0 on success, 2 on bad input (the reason on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

import yaml

from prefixpo.cli import name_mapping
from prefixpo.data import DataConfig, DataError, load_groups
from prefixpo.data.config import FORMATS, ON_BAD_ROW, TRUNCATION
from prefixpo.data.stats import stats_of
from prefixpo.sources import SourceError, check_dataset, check_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # flags not given do not override --config or the DataConfig defaults
    parser.add_argument("--config", help="YAML file with DataConfig keys (and 'tokenizer')")
    parser.add_argument("--dataset", default=s, help="hub name, .json/.jsonl/.parquet/.csv file, or save_to_disk dir")
    parser.add_argument("--tokenizer", default=s, help="tokenizer path or hub name (omit to only check the rows)")
    parser.add_argument("--format", default=s, choices=FORMATS)
    parser.add_argument("--split", default=s)
    parser.add_argument("--subset", default=s, help="hub dataset config name")
    parser.add_argument("--column-map", default=s, type=name_mapping, action="append", metavar="NAME=COLUMN",
                        help="map a canonical column to a dataset column (repeatable), e.g. chosen=good")
    parser.add_argument("--role-map", default=s, type=name_mapping, action="append", metavar="ROLE=ROLE")
    parser.add_argument("--max-samples", default=s, type=int)
    parser.add_argument("--shuffle", default=s, action="store_true", help="shuffle by --seed before --max-samples")
    parser.add_argument("--seed", default=s, type=int)
    parser.add_argument("--max-length", default=s, type=int, help="max tokens of prompt + longest response")
    parser.add_argument("--max-prompt-length", default=s, type=int)
    parser.add_argument("--truncation", default=s, choices=TRUNCATION)
    parser.add_argument("--min-score-ratio", default=s, type=float)
    parser.add_argument("--on-bad-row", default=s, choices=ON_BAD_ROW)
    parser.add_argument("--chat-template", dest="use_chat_template", default=s, action=argparse.BooleanOptionalAction,
                        help="chat template for strings too (default: messages only; strings stay raw text, as in TRL)")
    parser.add_argument("--merge-prompts", dest="merge_prompts", default=s, action=argparse.BooleanOptionalAction,
                        help="merge rows that share a prompt into one group (default: on)")
    parser.add_argument("--preference-column", default=s,
                        help="PKU-SafeRLHF style data: the id column of the preferred response (better_response_id)")
    parser.add_argument("--num-proc", default=s, type=int)
    parser.add_argument("--cache-dir", default=s)
    parser.add_argument("--no-cache", dest="use_cache", default=s, action="store_false")
    parser.add_argument("--json", action="store_true", help="print the statistics as one JSON line only")


def resolve(args: argparse.Namespace) -> tuple[DataConfig, str | None]:
    """The data config and tokenizer name from ``--config`` and the flags (flags win)."""
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"cannot read --config {args.config}: {e}") from None
        if not isinstance(values, dict):
            raise DataError(f"{args.config}: expected a mapping of DataConfig keys")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "json", "_module", "command", "overrides")}
    for key in ("column_map", "role_map"):
        if key in flags:
            flags[key] = dict(flags[key])
    values.update(flags)
    tokenizer = values.pop("tokenizer", None)
    if "dataset" not in values:
        raise DataError("no dataset: pass --dataset PATH_OR_NAME, or 'dataset:' in --config")
    return DataConfig.from_dict(values), tokenizer


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(f"cannot load tokenizer {name!r}: {type(e).__name__}: {e}") from None


def check_sources(cfg: DataConfig, tokenizer: str | None) -> None:
    """Fail in a second, in one line, on a dataset or tokenizer that is neither local nor reachable."""

    try:
        check_dataset(cfg.dataset, "--dataset")
        if tokenizer:
            check_tokenizer(tokenizer, "--tokenizer")
    except SourceError as e:
        raise DataError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    try:
        cfg, tokenizer_name = resolve(args)
        check_sources(cfg, tokenizer_name)
        tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name else None
        groups, report = load_groups(cfg, tokenizer)
    except DataError as e:
        print(f"prefixpo prepare: {e}", file=sys.stderr)
        return 2
    stats = stats_of(groups) if groups is not None and len(groups) else None
    if args.json:
        print(json.dumps({"rows_read": report.rows_read, "rows_kept": report.rows_kept,
                          "bad": report.counts(report.bad_rows), "filtered": report.counts(report.filtered),
                          "truncated": report.truncated, "format": report.format, "merge": asdict(report.merge),
                          "cache_hit": report.cache_hit,
                          "seconds": round(report.seconds, 3), "stats": asdict(stats) if stats else None}))
        return 0
    print(report.summary())
    print(f"{'cache hit' if report.cache_hit else 'tokenized'} in {report.seconds:.2f}s"
          + (f" (cache: {report.cache_path})" if report.cache_path else ""))
    if stats is not None:
        print(stats.table())
    elif tokenizer is None:
        print("rows checked only: pass --tokenizer to tokenize them and see token statistics")
    return 0
