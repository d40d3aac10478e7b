"""Dataset rows -> ``Example`` (one prompt, n responses, optional scores), one function per format.

Formats, by their canonical columns (``column_map`` maps a canonical name to a dataset column):

- ``explicit``: ``prompt`` + ``chosen`` + ``rejected`` (strings or chat message lists);
- ``implicit``: ``chosen`` + ``rejected`` whole conversations (message lists, or Anthropic-HH
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings), split after the last shared turn;
- ``ranked``: ``prompt`` + ``completions`` (items with a text and a score), or ``prompt`` +
  ``responses`` + ``scores`` as parallel lists: one group of n responses, best first;
- ``pairwise``: ``prompt`` + ``response_a`` + ``response_b`` with ``score_a``/``score_b`` and/or
  ``label`` (1 or "A" when A is preferred): the preferred response first;
- ``sft``: ``prompt`` + ``completion``, or ``messages`` (the last assistant turn is the response).

Responses of ``explicit``/``implicit`` come chosen first. Every problem raises ``RowError`` with
the dataset's own column name.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from prefixpo.data.errors import DataError, RowError

Message = dict[str, str]
Turns = str | list[Message]  # plain text, or chat messages
ROLES = ("system", "user", "assistant", "tool")

COLUMNS = {  # format -> alternative sets of required canonical columns, in detection order
    "explicit": [("prompt", "chosen", "rejected")],
    "ranked": [("prompt", "completions"), ("prompt", "responses", "scores")],
    "pairwise": [("prompt", "response_a", "response_b")],
    "implicit": [("chosen", "rejected")],
    "sft": [("messages",), ("prompt", "completion")],
}
OPTIONAL = ("score_a", "score_b", "label", "system")
# Column names some public datasets use for a canonical column (names only, used by auto-detection).
ALIASES = {"prompt": ("history", "instruction", "question"), "response_a": ("human_ref_A",),
           "response_b": ("human_ref_B",), "score_a": ("score_A",), "score_b": ("score_B",),
           "label": ("labels",)}
TEXT_KEYS = ("text", "response", "completion", "content")
SCORE_KEYS = ("score", "rating", "overall_score", "pm_score")


@dataclass(frozen=True)
class Example:
    """One prompt and its responses before tokenization; all text or all chat messages."""

    prompt: Turns
    responses: list[Turns]
    scores: list[float] | None = None
    pairs: list[tuple[int, int]] | None = None  # (chosen, rejected) fixed by the row, if any


class RowFiltered(RowError):
    """A row left out on purpose by an option (``min_score_ratio``): counted, not an error."""


def resolve_columns(columns: list[str], fmt: str, column_map: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Detect (or check) the format and map every canonical column to a dataset column.

    >>> resolve_columns(["prompt", "chosen", "rejected"], "auto", {})
    ('explicit', {'prompt': 'prompt', 'chosen': 'chosen', 'rejected': 'rejected'})
    >>> resolve_columns(["q", "good", "bad"], "auto", {"prompt": "q", "chosen": "good", "rejected": "bad"})[0]
    'explicit'
    """
    def check_mapping(found_format: str) -> None:
        """A mapping to a column the data lacks is a mistake even where the found format does not
        use the name (a prompt on implicit-prompt data), within the found format's kind (preference
        or SFT: one column_map may serve the stages of both)."""
        family = {"sft"} if found_format == "sft" else set(COLUMNS) - {"sft"}
        names = {c for f in family for req in COLUMNS[f] for c in req} | set(OPTIONAL)
        missing = {canon: actual for canon, actual in column_map.items() if actual not in columns and canon in names}
        if missing:
            raise DataError("; ".join(f"column_map maps {canon!r} to {actual!r}, which is not a column"
                                      for canon, actual in missing.items())
                            + f" (the columns are {columns}); map to one of them, or leave the name out")

    def lookup(name: str) -> str | None:
        if name in column_map:
            return column_map[name] if column_map[name] in columns else None
        return next((c for c in (name, *ALIASES.get(name, ())) if c in columns), None)

    candidates = COLUMNS if fmt == "auto" else {fmt: COLUMNS[fmt]}
    for name, alternatives in candidates.items():
        for required in alternatives:
            found = {c: lookup(c) for c in required}
            if all(found.values()):
                check_mapping(name)
                found.update({c: lookup(c) for c in OPTIONAL if lookup(c)})
                return name, found  # type: ignore[return-value]
    wanted = sorted({c for alts in candidates.values() for req in alts for c in req})
    hints = []
    for c in columns:
        close = difflib.get_close_matches(c, wanted, n=1, cutoff=0.6)
        if close and close[0] not in columns:
            hints.append(f"column {c!r} looks like {close[0]!r}: pass column_map={{{close[0]!r}: {c!r}}}")
    for canon, actual in column_map.items():
        if actual not in columns:
            hints.append(f"column_map maps {canon!r} to {actual!r}, which is not a column")
    what = "detect the format" if fmt == "auto" else f"read format {fmt!r}"
    needs = "; ".join(f"{n}: " + " or ".join("+".join(r) for r in alts) for n, alts in candidates.items())
    raise DataError(f"cannot {what} from columns {columns}. Needed columns, by format: {needs}"
                    + "".join(f"; {h}" for h in hints)
                    + ". Rename the columns, or map them with column_map (--column-map NAME=COLUMN; e.g. --column-map "
                    "chosen=good for a column 'good' holding the preferred response).")


def _get(row: dict[str, Any], cols: dict[str, str], name: str) -> Any:
    column = cols.get(name, name)
    value = row.get(column)
    if value is None:
        raise RowError("missing_column", column, f"column {column!r} is missing or null",
                       "give every row this column, or skip the row")
    return value


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise RowError("non_string", column, f"{column} is {type(value).__name__}, expected a string",
                       "store text as a string")
    if not value.strip():
        raise RowError("empty", column, f"{column} is empty", "remove the row or fill in the text")
    return value


def _messages(value: Any, column: str, role_map: dict[str, str]) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError("empty" if isinstance(value, list) else "non_string", column,
                       f"{column} must be a non-empty list of messages", "give a list of {role, content}")
    out = []
    for i, m in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("bad_message", where, f"{where} is not a message with 'role' and 'content'",
                           "write messages as {\"role\": ..., \"content\": ...}")
        role = role_map.get(m["role"], m["role"])
        if role not in ROLES:
            raise RowError("unknown_role", f"{where}.role", f"{where}.role is {m['role']!r}, not one of "
                           f"{', '.join(ROLES)}", "rename the role, or map it with role_map")
        out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
    return out


def _turns(value: Any, column: str, role_map: dict[str, str]) -> Turns:
    return _messages(value, column, role_map) if isinstance(value, list) else _text(value, column)


HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh(text: str, column: str) -> list[Message]:
    """Split an Anthropic-HH style transcript into messages.

    >>> parse_hh("\\n\\nHuman: Hi there\\n\\nAssistant: Hello", "chosen")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    parts = HH_MARKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("bad_transcript", column, f"{column} is not a '\\n\\nHuman: ...\\n\\nAssistant: ...' "
                       "transcript", "use a prompt column, or chat message lists")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": _text(said.strip(), column)}
            for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def split_shared(chosen: list[Message], rejected: list[Message], column: str) -> Example:
    """Split two conversations after their last shared turn, so both responses start as assistant.

    >>> u, a, b = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, \\
    ...     {"role": "assistant", "content": "b"}
    >>> split_shared([u, a], [u, b], "chosen").responses
    [[{'role': 'assistant', 'content': 'a'}], [{'role': 'assistant', 'content': 'b'}]]
    """
    if chosen == rejected:
        raise RowError("identical", column, "chosen and rejected are identical", "remove the row")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (k < len(chosen) and k < len(rejected) and chosen[k]["role"] == "assistant"
                         and rejected[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        raise RowError("no_shared_prompt", column, "chosen and rejected share no prompt ending before "
                       "an assistant turn", "use explicit prompt/chosen/rejected columns")
    return Example(chosen[:k], [chosen[k:], rejected[k:]])


def _strip_prompt(prompt: Turns, response: Turns) -> Turns:
    # Some datasets store chosen/rejected as the whole conversation, prompt included.
    if isinstance(prompt, list) and isinstance(response, list) and response[:len(prompt)] == prompt:
        return response[len(prompt):] or response
    return response


def _unify(example: Example) -> Example:
    """Text everywhere, or messages everywhere: a text prompt becomes a user turn, text responses
    become assistant turns, once any part is a message list."""
    parts = [example.prompt, *example.responses]
    if all(isinstance(p, str) for p in parts):
        return example
    prompt = [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else example.prompt
    responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in example.responses]
    return Example(prompt, responses, example.scores)


def _score(value: Any, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RowError("bad_score", column, f"{column} is {value!r}, expected a number", "store scores as numbers")
    return float(value)


def _check_distinct(example: Example, column: str) -> Example:
    for i, r in enumerate(example.responses):
        for j in range(i):
            if r == example.responses[j]:
                which = "chosen and rejected are" if len(example.responses) == 2 else f"responses {j} and {i} are"
                raise RowError("identical", column, f"{which} identical", "remove the row")
    if isinstance(example.prompt, list) and example.prompt[-1]["role"] == "assistant":
        raise RowError("bad_prompt", column, "the prompt ends with an assistant turn",
                       "end the prompt with a user turn")
    for r in example.responses:
        if isinstance(r, list) and r[0]["role"] != "assistant":
            raise RowError("bad_response", column, f"a response starts with a {r[0]['role']} turn, "
                           "not an assistant turn", "start every response with an assistant turn")
    return example


def _explicit(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    prompt = _turns(_get(row, cols, "prompt"), cols["prompt"], role_map)
    column = f"{cols['chosen']}/{cols['rejected']}"
    whole = [_turns(_get(row, cols, c), cols[c], role_map) for c in ("chosen", "rejected")]
    responses = [_strip_prompt(prompt, r) for r in whole]
    if all(isinstance(r, list) for r in whole) and any(r[0]["role"] != "assistant" for r in responses):
        # whole conversations (UltraFeedback binarized, Capybara): what they share is the prompt
        return _check_distinct(split_shared(whole[0], whole[1], column), column)  # type: ignore[arg-type]
    return _check_distinct(_unify(Example(prompt, responses)), column)


def _implicit(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    convs = []
    for c in ("chosen", "rejected"):
        value = _get(row, cols, c)
        convs.append(parse_hh(_text(value, cols[c]), cols[c]) if isinstance(value, str)
                     else _messages(value, cols[c], role_map))
    column = f"{cols['chosen']}/{cols['rejected']}"
    return _check_distinct(split_shared(convs[0], convs[1], column), column)


def _ranked(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    prompt = _turns(_get(row, cols, "prompt"), cols["prompt"], role_map)
    if "completions" in cols:
        column = cols["completions"]
        items = _get(row, cols, "completions")
        if not isinstance(items, list):
            raise RowError("non_string", column, f"{column} must be a list of completions", "store a list")
        texts, scores = [], []
        for i, item in enumerate(items):
            where = f"{column}[{i}]"
            if not isinstance(item, dict):
                raise RowError("bad_completion", where, f"{where} is not an object with a text and a score",
                               f"give each completion one of {TEXT_KEYS} and one of {SCORE_KEYS}")
            text_key = next((k for k in TEXT_KEYS if k in item), None)
            score_key = next((k for k in SCORE_KEYS if k in item), None)
            if text_key is None or score_key is None:
                raise RowError("bad_completion", where, f"{where} has keys {sorted(item)}, needs one of "
                               f"{TEXT_KEYS} and one of {SCORE_KEYS}", "rename the keys")
            texts.append(_turns(item[text_key], f"{where}.{text_key}", role_map))
            scores.append(_score(item[score_key], f"{where}.{score_key}"))
    else:
        column = cols["responses"]
        texts, scores = _get(row, cols, "responses"), _get(row, cols, "scores")
        if not isinstance(texts, list) or not isinstance(scores, list) or len(texts) != len(scores):
            raise RowError("bad_completion", f"{column}/{cols['scores']}", f"{column} and {cols['scores']} "
                           "must be lists of the same length", "give one score per response")
        texts = [_turns(t, f"{column}[{i}]", role_map) for i, t in enumerate(texts)]
        scores = [_score(s, f"{cols['scores']}[{i}]") for i, s in enumerate(scores)]
    if len(texts) < 2:
        raise RowError("too_few_responses", column, f"{column} has {len(texts)} completion(s), a preference "
                       "needs at least 2", "remove the row, or train it as SFT")
    if max(scores) == min(scores):
        raise RowError("no_pair", column, f"all {len(texts)} completions have the same score {scores[0]:g}, "
                       "so no pair can be formed", "remove the row")
    order = sorted(range(len(texts)), key=lambda i: -scores[i])  # best first, stable on ties
    example = Example(prompt, [_strip_prompt(prompt, texts[i]) for i in order], [scores[i] for i in order])
    return _check_distinct(_unify(example), column)


def _label(value: Any, column: str) -> bool:
    """True when response A is preferred."""
    if value in (1, "A", "a", True):
        return True
    if value in (0, "B", "b", False):
        return False
    raise RowError("bad_label", column, f"{column} is {value!r}, expected 1/'A' (A preferred) or 0/'B'",
                   "store labels as 1 or 0")


def _pairwise(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str],
              min_ratio: float | None) -> Example:
    prompt = _turns(_get(row, cols, "prompt"), cols["prompt"], role_map)
    a, b = (_turns(_get(row, cols, c), cols[c], role_map) for c in ("response_a", "response_b"))
    scores = None
    if "score_a" in cols and "score_b" in cols:
        scores = [_score(_get(row, cols, c), cols[c]) for c in ("score_a", "score_b")]
    if "label" in cols:
        a_first = _label(_get(row, cols, "label"), cols["label"])
    elif scores is not None and scores[0] != scores[1]:
        a_first = scores[0] > scores[1]
    else:
        raise RowError("no_preference", f"{cols['response_a']}/{cols['response_b']}",
                       "no label and no score difference says which response is preferred",
                       "add a label column, or remove ties")
    if scores is not None and not a_first:
        scores = scores[::-1]
    if min_ratio is not None:
        if scores is None:
            raise RowError("bad_score", "score_a/score_b", "min_score_ratio needs score columns",
                           "map score_a and score_b with column_map")
        hi, lo = scores
        ratio = hi / lo if lo > 0 else (math.inf if hi > lo else 1.0)
        if ratio < min_ratio:
            raise RowFiltered("score_ratio", f"{cols['score_a']}/{cols['score_b']}",
                              f"score ratio {ratio:.3g} is below min_score_ratio {min_ratio:g}")
    responses = [a, b] if a_first else [b, a]
    return _check_distinct(_unify(Example(prompt, responses, scores)), f"{cols['response_a']}/{cols['response_b']}")


def _sft(row: dict[str, Any], cols: dict[str, str], role_map: dict[str, str], _: float | None) -> Example:
    if "messages" in cols:
        column = cols["messages"]
        messages = _messages(_get(row, cols, "messages"), column, role_map)
        if messages[-1]["role"] != "assistant":
            raise RowError("no_response", column, f"{column} does not end with an assistant turn",
                           "end each conversation with the assistant turn to train on")
        if len(messages) < 2:
            raise RowError("empty", column, f"{column} has no prompt before the assistant turn",
                           "add the user turn")
        return _check_distinct(Example(messages[:-1], [messages[-1:]]), column)
    prompt = _turns(_get(row, cols, "prompt"), cols["prompt"], role_map)
    completion = _turns(_get(row, cols, "completion"), cols["completion"], role_map)
    return _check_distinct(_unify(Example(prompt, [_strip_prompt(prompt, completion)])), cols["completion"])


def with_system(example: Example, row: dict[str, Any], cols: dict[str, str]) -> Example:
    """Put a ``system`` column's text first in the prompt, as a system turn (empty text: no turn).

    >>> with_system(Example("Hi", ["Hello"]), {"system": "Be brief."}, {"system": "system"}).prompt
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    if "system" not in cols or row.get(cols["system"]) is None:
        return example
    value = row[cols["system"]]
    if not isinstance(value, str):
        raise RowError("non_string", cols["system"], f"{cols['system']} is {type(value).__name__}, expected a string",
                       "store the system prompt as a string")
    prompt = example.prompt if isinstance(example.prompt, list) else [{"role": "user", "content": example.prompt}]
    if not value.strip() or prompt[0]["role"] == "system":
        return example
    unified = _unify(Example(prompt, example.responses, example.scores, example.pairs))
    return Example([{"role": "system", "content": value}, *unified.prompt], unified.responses, unified.scores,  # type: ignore[misc]
                   unified.pairs)


PARSERS = {"explicit": _explicit, "implicit": _implicit, "ranked": _ranked, "pairwise": _pairwise, "sft": _sft}

