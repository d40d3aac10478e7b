"""``load_groups``: a data config and a tokenizer in, tokenized groups and a report out.

    rows (loading) -> Example (formats) -> token ids (tokenize) -> truncation -> Group

Rows are processed in ``num_proc`` workers with ``datasets.map``. The result is cached under
``cache_dir`` by a hash of the data (file content, or the hub dataset's fingerprint), the
tokenizer and every option that changes the output, so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from prefixpo.data.config import DataConfig
from prefixpo.data.errors import BadRow, DataError, RowError, bad_row_error
from prefixpo.data.formats import RowFiltered
from prefixpo.data.loading import load_source, local_fingerprint
from prefixpo.data.merge import MergeStats, merge_prompts
from prefixpo.data.schemas import parse_row, resolve_format
from prefixpo.data.tokenize import (
    RAW,
    TEMPLATE,
    TokenizerInfo,
    describe_tokenizer,
    rendering,
    tokenize_examples,
    tokenizer_fingerprint,
    truncate,
)
from prefixpo.layout import Group

CACHE_VERSION = 4  # 2: pairs column, merged groups, merge counts; 3: strings raw unless use_chat_template, EOS once;
# 4: responses identical once truncated are filtered
FEATURES = datasets.Features({
    "row": datasets.Value("int64"), "status": datasets.Value("string"), "kind": datasets.Value("string"),
    "column": datasets.Value("string"), "reason": datasets.Value("string"), "fix": datasets.Value("string"),
    "truncated": datasets.Value("bool"), "rendering": datasets.Value("string"),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
    "response_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "scores": datasets.Sequence(datasets.Value("float64")),
    "prompt_length": datasets.Value("int32"),
    "response_lengths": datasets.Sequence(datasets.Value("int32")),
    "pairs": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),  # [] unless the row fixes them
})
GROUP_COLUMNS = ["row", "prompt_ids", "response_ids", "scores", "prompt_length", "response_lengths", "pairs"]


@dataclass
class DataReport:
    """What happened to the rows: kept, bad (with row and reason), filtered on purpose, truncated."""

    source: str
    format: str
    columns: dict[str, str]
    rows_read: int
    rows_kept: int
    truncated: int
    bad_rows: list[BadRow] = field(default_factory=list)
    filtered: list[BadRow] = field(default_factory=list)
    row_unit: str = "row"
    cache_hit: bool = False
    cache_path: str | None = None
    seconds: float = 0.0
    merge: MergeStats = field(default_factory=MergeStats)
    tokens: str = ""  # how text became tokens (``describe_rendering``); empty when only checked

    def counts(self, rows: list[BadRow]) -> dict[str, int]:
        return dict(Counter(b.kind for b in rows).most_common())

    def summary(self, examples: int = 5) -> str:
        lines = [f"{self.source}: format {self.format}, {self.rows_read} rows read, {self.rows_kept} kept, "
                 f"{len(self.bad_rows)} bad (skipped), {len(self.filtered)} filtered, {self.truncated} truncated"
                 + (f", {self.merge.line()}" if self.merge.rows else "")
                 + (f", tokens: {self.tokens}" if self.tokens else "")]
        for title, rows in (("bad", self.bad_rows), ("filtered", self.filtered)):
            if rows:
                lines.append(f"  {title} by reason: {self.counts(rows)}")
                lines += [f"    {b.describe(self.row_unit)}" for b in rows[:examples]]
                if len(rows) > examples:
                    lines.append(f"    ... and {len(rows) - examples} more")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        values = json.loads(text)
        for key in ("bad_rows", "filtered"):
            values[key] = [BadRow(**b) for b in values[key]]
        values["merge"] = MergeStats(**values["merge"])
        return cls(**values)


def describe_rendering(templated: int, raw: int, info: TokenizerInfo) -> str:
    """The report's words for how the kept rows became tokens.

    >>> info = TokenizerInfo(True, False, True, "</s>", None)
    >>> describe_rendering(3, 0, info)
    'chat template'
    >>> describe_rendering(0, 3, info)
    'raw text (strings are not templated; use_chat_template: true applies the chat template)'
    >>> describe_rendering(2, 1, info)
    'chat template for 2 rows, raw text for 1'
    """
    if templated and raw:
        return f"chat template for {templated} row{'s' * (templated != 1)}, raw text for {raw}"
    if templated:
        return "chat template"
    if info.has_template and info.template_messages:  # the default: strings stay raw, as in TRL
        return "raw text (strings are not templated; use_chat_template: true applies the chat template)"
    return "raw text"


def _from_text(row: dict[str, Any], fmt: str, cols: dict[str, str]) -> bool | None:
    """Whether a row's conversation was written as text although parsed into messages (an
    Anthropic-HH ``implicit`` transcript): such data are strings, so raw text by default."""
    if fmt == "implicit" and isinstance(row.get(cols.get("chosen", "")), str):
        return True
    return None


class TokenizedGroups(Sequence[Group]):
    """The kept groups, backed by an Arrow dataset (memory-mapped when cached); indexing gives a ``Group``.

    ``dataset`` also has ``row`` (the source row), ``prompt_length`` and ``response_lengths``.
    """

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self.dataset[int(i)]
        return Group(r["prompt_ids"], r["response_ids"], r["scores"], r["pairs"] or None)

    def __iter__(self) -> Iterator[Group]:
        for batch in self.dataset.select_columns(["prompt_ids", "response_ids", "scores", "pairs"]).iter(1024):
            yield from (Group(p, r, s, pairs or None) for p, r, s, pairs in zip(
                batch["prompt_ids"], batch["response_ids"], batch["scores"], batch["pairs"], strict=True))


def _result(row: int, status: str = "ok", err: RowError | None = None, prompt: list[int] | None = None,
            responses: list[list[int]] | None = None, scores: list[float] | None = None,
            truncated: bool = False, pairs: list[tuple[int, int]] | None = None, mode: str = "") -> dict[str, Any]:
    responses = responses or []
    return {"row": row, "status": status, "kind": err.kind if err else "", "column": err.column if err else "",
            "reason": err.reason if err else "", "fix": err.fix if err else "", "truncated": truncated, "rendering": mode,
            "prompt_ids": prompt or [], "response_ids": responses, "scores": scores,
            "prompt_length": len(prompt or []), "response_lengths": [len(r) for r in responses],
            "pairs": [list(p) for p in pairs or ()]}


def process_batch(batch: dict[str, list[Any]], fmt: str, cols: dict[str, str], cfg: DataConfig,
                  tokenizer: Any, info: TokenizerInfo | None) -> dict[str, list[Any]]:
    """One ``datasets.map`` batch: parse, tokenize and truncate each row, recording every failure."""
    names = [k for k in batch if k != "_row"]
    parsed: list[Any] = []
    from_text: list[bool | None] = []
    for i in range(len(batch["_row"])):
        try:
            if "_json" in batch:
                try:
                    row = json.loads(batch["_json"][i])
                except json.JSONDecodeError as e:
                    raise RowError("malformed_json", "-", f"not valid JSON ({e.msg} at column {e.colno})",
                                   "fix or remove the line") from None
                if not isinstance(row, dict):
                    raise RowError("malformed_json", "-", f"a {type(row).__name__}, not a JSON object",
                                   "write one JSON object per line")
            else:
                row = {k: batch[k][i] for k in names}
            parsed.append(parse_row(row, fmt, cols, cfg.role_map, cfg.min_score_ratio))
            from_text.append(_from_text(row, fmt, cols))
        except RowError as e:
            parsed.append(e)
    ok = [p for p in parsed if not isinstance(p, RowError)]
    modes = iter([rendering(p, info, t) for p, t in zip(ok, from_text, strict=True)] if info is not None
                 else [""] * len(ok))
    tokenized = iter(tokenize_examples(ok, tokenizer, info, from_text) if info is not None  # type: ignore[arg-type]
                     else [None] * len(ok))
    results = []
    for row_number, p in zip(batch["_row"], parsed, strict=True):
        if isinstance(p, RowError):
            results.append(_result(row_number, "filtered" if isinstance(p, RowFiltered) else "bad", p))
            continue
        t, mode = next(tokenized), next(modes)
        if t is None:  # validation only
            results.append(_result(row_number, scores=p.scores))
            continue
        try:
            if isinstance(t, RowError):
                raise t
            prompt, responses, cut = truncate(t[0], t[1], cfg.max_length, cfg.max_prompt_length,
                                              cfg.truncation, info.bos_token_id, cfg.pairs)
            results.append(_result(row_number, "ok", None, prompt, responses, p.scores, cut, p.pairs, mode))
        except RowError as e:
            results.append(_result(row_number, "filtered" if isinstance(e, RowFiltered) else "bad", e))
    return {k: [r[k] for r in results] for k in FEATURES}


def cache_key(fingerprint: str, tokenizer_fp: str, cfg: DataConfig) -> str:
    payload = {"version": CACHE_VERSION, "data": fingerprint, "tokenizer": tokenizer_fp,
               "options": cfg.cache_options()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _load_cached(path: str, started: float) -> tuple[TokenizedGroups, DataReport] | None:
    if (report := _entry_report(path)) is None:
        return None
    report.cache_hit, report.cache_path = True, path
    with no_datasets_bars():
        groups = TokenizedGroups(datasets.load_from_disk(os.path.join(path, "groups")))
    report.seconds = time.perf_counter() - started
    return groups, report


def _entry_report(path: str) -> DataReport | None:
    """The report of the cache entry at ``path`` when the entry is one to read: its report and
    groups there (the report is written last) and some rows kept. None for a missing, unreadable
    or empty one (an empty result, cached by an older version: the data are read again, to say
    why), which a new entry then replaces."""
    try:
        with open(os.path.join(path, "report.json")) as f:
            report = DataReport.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.rows_kept == 0 or not os.path.isdir(os.path.join(path, "groups")):
        return None
    return report


@contextmanager
def no_datasets_bars() -> Iterator[None]:
    """``datasets``' progress bars off for the block (the tokenizing bar is prefixpo's own and stays)."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _save_cache(path: str, groups: datasets.Dataset, report: DataReport) -> None:
    """Written into a directory of its own and renamed into place, so a reader finds a whole entry
    or none. Processes that tokenize the same data at once (the ranks of a run, on one disk or a
    shared one) each write a copy; an entry one of them put in place first is the same key, so the
    same groups: it stays, and the later copies are dropped (deleting it could pull its files from
    under a process reading them). Only an entry ``_entry_report`` refuses is replaced, moved aside
    first so that no complete entry is ever deleted in its place."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{name}.tmp-")
    try:
        groups.save_to_disk(os.path.join(tmp, "groups"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write(report.to_json())
        if os.path.exists(path) and _entry_report(path) is None:
            stale = tempfile.mkdtemp(dir=parent, prefix=f"{name}.stale-")
            try:
                os.replace(path, os.path.join(stale, "entry"))
            except OSError:  # another process moved or replaced it meanwhile
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # a non-empty directory is there: another process's entry
            if _entry_report(path) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _row_problems(out: datasets.Dataset, status: list[str]) -> tuple[list[BadRow], list[BadRow]]:
    """The bad and the filtered rows of ``process_batch``'s output, each sorted by row."""
    problems = [i for i, s in enumerate(status) if s != "ok"]
    details = out.select(problems).select_columns(["row", "status", "kind", "column", "reason", "fix"]).to_list()
    rows: dict[str, list[BadRow]] = {"bad": [], "filtered": []}
    for d in details:
        rows[d["status"]].append(BadRow(d["row"], d["kind"], d["column"], d["reason"], d["fix"]))
    return sorted(rows["bad"], key=lambda b: b.row), sorted(rows["filtered"], key=lambda b: b.row)


def load_groups(cfg: DataConfig, tokenizer: Any | None) -> tuple[TokenizedGroups | None, DataReport]:
    """Read, check and tokenize a preference (or SFT) dataset into groups.

    Raises ``DataError`` on a config or column problem, and on the first bad row unless
    ``cfg.on_bad_row == "skip"``. ``tokenizer=None`` only checks the rows (groups are ``None``).
    """
    started = time.perf_counter()
    if cfg.num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
    info = describe_tokenizer(tokenizer, cfg.use_chat_template) if tokenizer is not None else None
    tok_fp = tokenizer_fingerprint(tokenizer, info) if info is not None else ""
    use_cache = cfg.use_cache and cfg.cache_dir is not None and info is not None
    if use_cache and os.path.exists(cfg.dataset):  # local data: look before loading anything
        path = os.path.join(cfg.cache_dir, cache_key(local_fingerprint(cfg.dataset), tok_fp, cfg))
        if (hit := _load_cached(path, started)) is not None:
            return hit
    source = load_source(cfg)
    label, fmt, cols = resolve_format(source.columns, cfg.format, cfg.column_map, cfg.preference_column)
    path = os.path.join(cfg.cache_dir, cache_key(source.fingerprint, tok_fp, cfg)) if use_cache else None
    if path is not None and (hit := _load_cached(path, started)) is not None:
        return hit
    out = source.rows.map(
        process_batch, batched=True, batch_size=1000, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=source.rows.column_names, features=FEATURES, keep_in_memory=True,
        fn_kwargs={"fmt": fmt, "cols": cols, "cfg": cfg, "tokenizer": tokenizer, "info": info},
        new_fingerprint=hashlib.sha256(f"{source.fingerprint}{tok_fp}{cfg}".encode()).hexdigest()[:16],
        desc="prefixpo: tokenizing")
    status = out["status"]
    bad, filtered = _row_problems(out, status)
    unit = "line" if "_json" in source.rows.column_names and source.name.endswith(".jsonl") else "row"
    if template := next((b for b in bad if b.kind == "template"), None):
        raise DataError(f"{source.name}: {template.reason}. Fix: {template.fix}")
    if bad and cfg.on_bad_row == "error":
        raise bad_row_error(source.name, bad[0], len(bad), unit)
    kept = out.select([i for i, s in enumerate(status) if s == "ok"]).select_columns(GROUP_COLUMNS)
    report = DataReport(source.name, label, cols, len(out), len(kept), int(sum(out["truncated"])), bad, filtered, unit)
    if info is not None:
        modes = Counter(out["rendering"])
        report.tokens = describe_rendering(modes[TEMPLATE], modes[RAW], info)
    if not len(kept):  # checked before the cache: an empty dataset is an error, not a cached result
        reasons = report.counts(bad + filtered)
        raise DataError(f"{source.name}: no usable rows: {len(out)} read" + (f", by reason {reasons}" if reasons else "")
                        + ". Fix the data, or check split, format and column_map")
    if info is None:
        report.seconds = time.perf_counter() - started
        return None, report
    kept = _merge_and_cache(kept, report, cfg.merge_prompts, path)
    report.seconds = time.perf_counter() - started
    return TokenizedGroups(kept), report


def _merge_and_cache(kept: datasets.Dataset, report: DataReport, merge: bool, path: str | None) -> datasets.Dataset:
    """The kept groups, merged by prompt (``merge``) and, with a cache ``path``, saved there and read back."""
    with no_datasets_bars():  # datasets' own housekeeping bars, between prefixpo's lines
        kept = kept.flatten_indices()
        if merge:
            kept, report.merge = merge_prompts(kept, datasets.Features({k: FEATURES[k] for k in GROUP_COLUMNS}))
        if path is not None:
            _save_cache(path, kept, report)
            kept = datasets.load_from_disk(os.path.join(path, "groups"))
            report.cache_path = path
    return kept
