"""Rows that share a prompt become one group, so the prompt is computed once for all their pairs.

Two tokenized rows share a prompt when their prompt ids are equal. Only *pair rows* merge: rows
whose pair is fixed by the data (their own ``pairs``, or two responses with the preferred first and
no scores or a higher first score). Rows that tie, ranked rows (n responses whose pairs depend on
``pair_strategy``) and single-response rows stay as they are. A merged group holds every distinct
response once (equal token ids are one response) and, as ``pairs``, each row's (chosen, rejected)
pair in row order, duplicates included: exactly the pairs the rows give one by one::

    rows   P: [a, b]   P: [c, b]   Q: [d, e]
    groups P: [a, b, c] pairs [(0, 1), (2, 1)]     Q: [d, e]   (unchanged)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

Row = dict[str, Any]


@dataclass(frozen=True)
class MergeStats:
    """``rows`` pair rows folded into ``groups`` merged groups; their tokens before and after."""

    rows: int = 0
    groups: int = 0
    tokens_before: int = 0
    tokens_after: int = 0

    def line(self) -> str:
        """The report's sentence.

        >>> MergeStats(6, 2, 300, 200).line()
        'merged 6 rows sharing a prompt into 2 groups (tokens 300 -> 200, 1.50x fewer)'
        """
        saving = self.tokens_before / self.tokens_after if self.tokens_after else 1.0
        return (f"merged {self.rows} rows sharing a prompt into {self.groups} groups "
                f"(tokens {self.tokens_before} -> {self.tokens_after}, {saving:.2f}x fewer)")


def row_pairs(row: Row) -> list[tuple[int, int]] | None:
    """The (chosen, rejected) pairs a row trains on whatever the pair strategy, or None when they
    depend on it (or the row gives no pair), so the row must not merge.

    >>> row_pairs({"response_ids": [[1], [2]], "scores": None, "pairs": []})
    [(0, 1)]
    >>> row_pairs({"response_ids": [[1], [2]], "scores": [3.0, 3.0], "pairs": []}) is None
    True
    >>> row_pairs({"response_ids": [[1], [2], [3]], "scores": [3.0, 2.0, 1.0], "pairs": [[0, 2]]})
    [(0, 2)]
    """
    responses = row["response_ids"]
    if row.get("pairs"):
        pairs = [(int(c), int(r)) for c, r in row["pairs"]]
    elif len(responses) == 2 and (row["scores"] is None or row["scores"][0] > row["scores"][1]):
        pairs = [(0, 1)]
    else:
        return None
    return pairs if all(responses[c] != responses[r] for c, r in pairs) else None


def merge_rows(rows: Sequence[Row]) -> Row:
    """One group from pair rows with equal ``prompt_ids``: distinct responses in first-seen order,
    every row's pairs mapped onto them, scores kept where every row has them and they agree.

    >>> rows = [{"row": 1, "prompt_ids": [7], "response_ids": [[1], [2]], "scores": [5.0, 1.0], "pairs": []},
    ...         {"row": 4, "prompt_ids": [7], "response_ids": [[3], [2]], "scores": [4.0, 1.0], "pairs": []}]
    >>> g = merge_rows(rows)
    >>> g["response_ids"], g["scores"], g["pairs"], g["row"]
    ([[1], [2], [3]], [5.0, 1.0, 4.0], [[0, 1], [2, 1]], 1)
    """
    index: dict[tuple[int, ...], int] = {}
    responses: list[list[int]] = []
    scores: list[float | None] = []
    pairs: list[list[int]] = []
    consistent = True
    for row in rows:
        local = []
        for i, ids in enumerate(row["response_ids"]):
            key = tuple(ids)
            score = row["scores"][i] if row["scores"] is not None else None
            if key not in index:
                index[key] = len(responses)
                responses.append(list(ids))
                scores.append(score)
            elif scores[index[key]] != score:
                consistent = False
            local.append(index[key])
        pairs += [[local[c], local[r]] for c, r in row_pairs(row) or ()]
    keep_scores = consistent and all(s is not None for s in scores)
    return {"row": rows[0]["row"], "prompt_ids": list(rows[0]["prompt_ids"]), "response_ids": responses,
            "scores": scores if keep_scores else None, "pairs": pairs,
            "prompt_length": len(rows[0]["prompt_ids"]), "response_lengths": [len(r) for r in responses]}


def _tokens(row: Row) -> int:
    return len(row["prompt_ids"]) + sum(len(r) for r in row["response_ids"])


def merge_prompts(groups: datasets.Dataset, features: datasets.Features) -> tuple[datasets.Dataset, MergeStats]:
    """Merge the pair rows of ``groups`` (columns of ``features``) that share a prompt; the dataset
    comes back unchanged (the same object) when no two pair rows do."""
    seen: dict[bytes, list[int]] = {}
    for i, prompt in enumerate(groups.select_columns(["prompt_ids"]).with_format("numpy")["prompt_ids"]):
        seen.setdefault(prompt.astype("int64").tobytes(), []).append(i)
    shared = [ix for ix in seen.values() if len(ix) > 1]
    if not shared:
        return groups, MergeStats()
    candidates = sorted(i for ix in shared for i in ix)
    rows = dict(zip(candidates, groups.select(candidates).to_list(), strict=True))
    into: dict[int, list[int]] = {}  # first row of a merged group -> its rows
    for ix in shared:
        members = [i for i in ix if row_pairs(rows[i]) is not None]
        if len(members) > 1:
            into[members[0]] = members
    if not into:
        return groups, MergeStats()
    folded = {i for members in into.values() for i in members}
    merged = {first: merge_rows([rows[i] for i in members]) for first, members in into.items()}
    stats = MergeStats(len(folded), len(merged), sum(_tokens(rows[i]) for i in folded),
                       sum(_tokens(g) for g in merged.values()))
    keep = [i for i in range(len(groups)) if i not in folded or i in merged]
    out = groups.select(keep).to_list()
    for k, i in enumerate(keep):
        if i in merged:
            out[k] = merged[i]
    columns = {name: [r[name] for r in out] for name in features}
    return datasets.Dataset.from_dict(columns, features=features), stats
