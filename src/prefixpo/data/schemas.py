"""Public dataset schemas: recognised by their exact column names, read into the existing formats.

A schema names the columns a published dataset has (``required``), the format family its rows
become (``explicit``, ``implicit``, ``ranked``, ``pairwise``) and how its columns map to the
canonical ones; a few need their own parser (nested lists, ranks, ids). Detection
(``detect_schema``) only runs under ``format: auto`` without a ``column_map``; when several
schemas match, the one whose columns include every other match's wins, and a tie is an error.
Datasets that are already in a generic format (Anthropic HH ``chosen``/``rejected`` transcripts,
TL;DR ``prompt``/``chosen``/``rejected`` strings) need no schema.

    >>> detect_schema(["qid", "question", "answers", "date", "metadata"]).name
    'stack_exchange'
    >>> detect_schema(["prompt", "chosen", "rejected"]) is None
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefixpo.data.errors import DataError, RowError
from prefixpo.data.formats import (
    PARSERS,
    Example,
    _check_distinct,
    _get,
    _score,
    _text,
    _unify,
    parse_hh,
    resolve_columns,
    with_system,
)

Parser = Callable[[dict[str, Any], dict[str, str], dict[str, str], float | None], Example]


@dataclass(frozen=True)
class Schema:
    """A published dataset layout: its columns, its format family, its column mapping."""

    name: str
    required: frozenset[str]
    family: str
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> dataset column
    parser: Parser | None = None  # None: the family's parser with ``columns``

    def parse(self, row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str],
              min_ratio: float | None) -> Example:
        return (self.parser or PARSERS[self.family])(row, cols, role_map, min_ratio)


def _scored_pair(chosen_score: str, rejected_score: str) -> Callable[[str], Parser]:
    """A chosen/rejected parser of ``family`` that keeps the published scores and the declared pair
    (chosen over rejected, even where the scores tie)."""
    def make(family: str) -> Parser:
        def parse(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], m: float | None) -> Example:
            ex = PARSERS[family](row, cols, role_map, m)
            scores = [_score(_get(row, cols, c), cols[c]) for c in (chosen_score, rejected_score)]
            return Example(ex.prompt, ex.responses, scores, [(0, 1)])
        return parse
    return make


HH_OPEN_TURN = re.compile(r"\n\nAssistant:\s*$")


def _nectar(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    """Nectar: an HH ``prompt`` ending in an open ``Assistant:`` turn, ``answers`` ranked 1 (best)
    down; the score of an answer is minus its rank.

    >>> _nectar({"prompt": "\\n\\nHuman: Hi?\\n\\nAssistant:", "answers": [{"answer": "B", "rank": 2},
    ...     {"answer": "A", "rank": 1}]}, {"prompt": "prompt", "answers": "answers"}, {}, None).responses
    [[{'role': 'assistant', 'content': 'A'}], [{'role': 'assistant', 'content': 'B'}]]
    """
    prompt = parse_hh(HH_OPEN_TURN.sub("", _text(_get(row, cols, "prompt"), cols["prompt"])), cols["prompt"])
    column = cols["answers"]
    items = _get(row, cols, "answers")
    if not isinstance(items, list) or len(items) < 2:
        raise RowError("too_few_responses", column, f"{column} must be a list of at least 2 answers",
                       "remove the row")
    ranked = []
    for i, item in enumerate(items):
        where = f"{column}[{i}]"
        if not isinstance(item, dict) or "answer" not in item or "rank" not in item:
            raise RowError("bad_completion", where, f"{where} needs 'answer' and 'rank'", "rename the keys")
        ranked.append((_score(item["rank"], f"{where}.rank"), _text(item["answer"], f"{where}.answer")))
    ranked.sort(key=lambda x: x[0])  # rank 1 first, stable on ties
    if ranked[0][0] == ranked[-1][0]:
        raise RowError("no_pair", column, "all answers have the same rank", "remove the row")
    example = Example(prompt, [t for _, t in ranked], [-r for r, _ in ranked])
    return _check_distinct(_unify(example), column)


def _summarize(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    """openai/summarize_from_feedback comparisons: the post (``info``) as a TL;DR prompt, the
    ``choice`` summary first.

    >>> row = {"info": {"post": "My cat hides.", "title": "Cat?", "subreddit": "cats"},
    ...        "summaries": [{"text": " Cat hides."}, {"text": " Dog."}], "choice": 0}
    >>> ex = _summarize(row, {"info": "info", "summaries": "summaries", "choice": "choice"}, {}, None)
    >>> ex.prompt, ex.responses
    ('SUBREDDIT: r/cats\\nTITLE: Cat?\\nPOST: My cat hides.\\nTL;DR:', [' Cat hides.', ' Dog.'])
    """
    info, column = _get(row, cols, "info"), cols["info"]
    if not isinstance(info, dict):
        raise RowError("non_string", column, f"{column} must be an object with post, title, subreddit",
                       "store info as published")
    if isinstance(info.get("post"), str):
        prompt = (f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info.get('title') or ''}\n"
                  f"POST: {_text(info['post'], f'{column}.post')}\nTL;DR:")
    else:
        prompt = f"{_text(info.get('article'), f'{column}.article')}\nTL;DR:"
    summaries, where = _get(row, cols, "summaries"), cols["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise RowError("bad_completion", where, f"{where} must be a list of 2 summaries", "remove the row")
    texts = [_text(s.get("text"), f"{where}[{i}].text") for i, s in enumerate(summaries)]
    choice = _get(row, cols, "choice")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise RowError("bad_label", cols["choice"], f"{cols['choice']} is {choice!r}, expected 0 or 1",
                       "store the preferred summary's index")
    return _check_distinct(Example(prompt, [texts[choice], texts[1 - choice]]), where)


def _pku(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    """PKU-SafeRLHF: ``response_0``/``response_1``, the one named by the preference column
    (``better_response_id`` unless ``preference_column`` says otherwise) first.

    >>> cols = {"prompt": "prompt", "preference": "safer_response_id"}
    >>> _pku({"prompt": "Q", "response_0": "a", "response_1": "b", "safer_response_id": 1}, cols, {}, None).responses
    ['b', 'a']
    """
    prompt = _text(_get(row, cols, "prompt"), cols["prompt"])
    texts = [_text(_get(row, cols, c), c) for c in ("response_0", "response_1")]
    column = cols["preference"]
    better = _get(row, cols, "preference")
    if isinstance(better, bool) or better not in (0, 1):
        raise RowError("bad_label", column, f"{column} is {better!r}, expected 0 or 1",
                       "store the preferred response's index")
    return _check_distinct(Example(prompt, [texts[better], texts[1 - better]]), "response_0/response_1")


UF_BINARIZED = _scored_pair("score_chosen", "score_rejected")
CAPYBARA = _scored_pair("rating_chosen", "rating_rejected")
PAIR = {"chosen": "chosen", "rejected": "rejected"}

SCHEMAS = [
    Schema("ultrafeedback_binarized", frozenset({"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}),
           "explicit", {"prompt": "prompt", **PAIR, "score_chosen": "score_chosen", "score_rejected": "score_rejected"},
           UF_BINARIZED("explicit")),
    Schema("ultrafeedback_binarized", frozenset({"chosen", "rejected", "score_chosen", "score_rejected"}),
           "implicit", {**PAIR, "score_chosen": "score_chosen", "score_rejected": "score_rejected"},
           UF_BINARIZED("implicit")),
    Schema("capybara_dpo", frozenset({"prompt", "chosen", "rejected", "rating_chosen", "rating_rejected",
                                      "chosen_model", "rejected_model"}),
           "explicit", {"prompt": "prompt", **PAIR, "rating_chosen": "rating_chosen",
                        "rating_rejected": "rating_rejected"}, CAPYBARA("explicit")),
    Schema("orca_dpo_pairs", frozenset({"system", "question", "chosen", "rejected"}),
           "explicit", {"prompt": "question", **PAIR, "system": "system"}),
    Schema("shp", frozenset({"post_id", "history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"}),
           "pairwise", {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B",
                        "score_a": "score_A", "score_b": "score_B", "label": "labels"}),
    Schema("stack_exchange", frozenset({"qid", "question", "answers"}),
           "ranked", {"prompt": "question", "completions": "answers"}),
    Schema("ultrafeedback", frozenset({"instruction", "completions"}),
           "ranked", {"prompt": "instruction", "completions": "completions"}),
    Schema("nectar", frozenset({"prompt", "answers"}), "ranked", {"prompt": "prompt", "answers": "answers"}, _nectar),
    Schema("summarize_from_feedback", frozenset({"info", "summaries", "choice"}),
           "pairwise", {"info": "info", "summaries": "summaries", "choice": "choice"}, _summarize),
    Schema("pku_saferlhf", frozenset({"prompt", "response_0", "response_1", "better_response_id",
                                      "safer_response_id"}),
           "pairwise", {"prompt": "prompt", "preference": "better_response_id"}, _pku),
]
SCHEMA_NAMES = tuple(dict.fromkeys(s.name for s in SCHEMAS))
# parse_row's key for a schema: "<family>:<name>" (one name may have several layouts, one per family)
SCHEMA_PARSERS: dict[str, Parser] = {f"{s.family}:{s.name}": s.parse for s in SCHEMAS}


def detect_schema(columns: list[str], name: str | None = None) -> Schema | None:
    """The schema whose columns the dataset has (``name``: only that schema's layouts), or None.

    >>> detect_schema(["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
    ...                "score_rejected"]).family
    'explicit'
    >>> detect_schema(["chosen", "rejected", "score_chosen", "score_rejected"]).family
    'implicit'
    """
    have = set(columns)
    matches = [s for s in SCHEMAS if s.required <= have and name in (None, s.name)]
    if not matches:
        return None
    widest = max(matches, key=lambda s: len(s.required))
    if any(not s.required <= widest.required for s in matches):
        names = ", ".join(sorted({s.name for s in matches}))
        raise DataError(f"columns {columns} match several dataset schemas ({names}): set format to a "
                        "generic format with column_map, or remove the extra columns")
    return widest


def schema_columns(schema: Schema, preference_column: str | None) -> dict[str, str]:
    """The schema's column mapping, with ``preference_column`` where the schema has a preference.

    >>> schema_columns(SCHEMAS[-1], "safer_response_id")["preference"]
    'safer_response_id'
    """
    cols = dict(schema.columns)
    if preference_column is not None and "preference" in cols:
        cols["preference"] = preference_column
    return cols


def resolve_format(columns: list[str], fmt: str, column_map: dict[str, str],
                   preference_column: str | None = None) -> tuple[str, str, dict[str, str]]:
    """``(report label, parse_row key, columns)``: a public schema when ``fmt`` is ``auto`` (without
    a ``column_map``) or a schema name, else a generic format (``formats.resolve_columns``).

    >>> resolve_format(["system", "question", "chosen", "rejected"], "auto", {})[:2]
    ('explicit (orca_dpo_pairs)', 'explicit:orca_dpo_pairs')
    >>> resolve_format(["prompt", "chosen", "rejected"], "auto", {})[:2]
    ('explicit', 'explicit')
    """
    schema = None
    if fmt in SCHEMA_NAMES:
        schema = detect_schema(columns, fmt)
        if schema is None:
            needs = " or ".join("+".join(sorted(s.required)) for s in SCHEMAS if s.name == fmt)
            raise DataError(f"format {fmt!r} needs the columns {needs}; the dataset has {columns}")
    elif fmt == "auto" and not column_map:
        schema = detect_schema(columns)
    if schema is not None:
        if preference_column is not None and "preference" not in schema.columns:
            raise DataError(f"preference_column={preference_column!r} does not apply to {schema.name} data")
        if preference_column is not None and preference_column not in columns:
            raise DataError(f"preference_column={preference_column!r} is not a column of the dataset ({columns})")
        cols = schema_columns(schema, preference_column)
        if "system" in columns and "system" not in cols:
            cols["system"] = "system"
        return f"{schema.family} ({schema.name})", f"{schema.family}:{schema.name}", cols
    if preference_column is not None:
        raise DataError(f"preference_column={preference_column!r} applies to PKU-SafeRLHF style data "
                        "(response_0, response_1, better_response_id, safer_response_id); this dataset is not")
    name, cols = resolve_columns(columns, fmt, column_map)
    return name, name, cols


def parse_row(row: dict[str, Any], fmt: str, cols: dict[str, str], role_map: dict[str, str] | None = None,
              min_score_ratio: float | None = None) -> Example:
    """One dataset row -> ``Example`` by the parser of ``fmt``, a generic format or a ``resolve_format``
    key of a schema; raises ``RowError`` naming the column and the fix.

    >>> cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    >>> parse_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "explicit", cols)
    Example(prompt='2+2?', responses=['4', '5'], scores=None, pairs=None)
    """
    parser = SCHEMA_PARSERS.get(fmt) or PARSERS[fmt]
    return with_system(parser(row, cols, role_map or {}, min_score_ratio), row, cols)
