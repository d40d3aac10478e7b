"""Bad input: the default stops with the file, row, column and fix; ``skip`` reports every row and why."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.data import DataConfig, DataError, load_groups

datasets.disable_progress_bars()
BAD = str(FIXTURES / "bad_rows.jsonl")
EXPECTED = [  # (line, kind, column, reason) for every bad line of bad_rows.jsonl
    (2, "empty", "prompt", "prompt is empty"),
    (3, "identical", "chosen/rejected", "chosen and rejected are identical"),
    (4, "non_string", "chosen", "chosen is int, expected a string"),
    (5, "unknown_role", "prompt[0].role", "prompt[0].role is 'narrator', not one of system, user, assistant, tool"),
    (6, "malformed_json", "-", "not valid JSON (Expecting value at column 61)"),
    (8, "missing_column", "rejected", "column 'rejected' is missing or null"),
    (9, "empty", "chosen", "chosen is empty"),
]


def test_default_stops_at_first_bad_row_naming_file_line_column_and_fix():
    with pytest.raises(DataError) as e:
        load_groups(DataConfig(BAD, cache_dir=None), make_tokenizer())
    message = str(e.value)
    assert message.startswith(f"{BAD}: line 2, column prompt: prompt is empty (remove the row or fill in the text)")
    assert "; 6 more bad rows in this dataset. Fix the data" in message
    assert "\n" not in message and "on_bad_row='skip'" in message


def test_skip_reports_every_bad_row_and_why():
    groups, report = load_groups(DataConfig(BAD, cache_dir=None, on_bad_row="skip"), make_tokenizer())
    assert [(b.row, b.kind, b.column, b.reason) for b in report.bad_rows] == EXPECTED
    assert report.rows_read == 9 and report.rows_kept == len(groups) == 2
    assert report.counts(report.bad_rows) == {"empty": 2, "identical": 1, "non_string": 1, "unknown_role": 1,
                                              "malformed_json": 1, "missing_column": 1}
    assert "line 2, column prompt: prompt is empty" in report.summary()


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def one_bad(tmp_path, rows, **options):
    """The (row, kind, column, reason) of the only bad row."""
    _, report = load_groups(DataConfig(write(tmp_path, rows), cache_dir=None, on_bad_row="skip", **options),
                            make_tokenizer())
    assert len(report.bad_rows) == 1, report.bad_rows
    b = report.bad_rows[0]
    return b.row, b.kind, b.column, b.reason


GOOD = {"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}


def test_missing_columns_whole_file_named_with_suggestion(tmp_path):
    path = write(tmp_path, [{"prompt": "Hi", "chosen": "A", "rejectd": "B"}])
    with pytest.raises(DataError) as e:
        load_groups(DataConfig(path, cache_dir=None), make_tokenizer())
    assert "cannot detect the format from columns ['prompt', 'chosen', 'rejectd']" in str(e.value)
    assert "column 'rejectd' looks like 'rejected': pass column_map={'rejected': 'rejectd'}" in str(e.value)


def test_named_format_with_missing_columns(tmp_path):
    path = write(tmp_path, [GOOD])
    with pytest.raises(DataError, match="cannot read format 'ranked' from columns"):
        load_groups(DataConfig(path, format="ranked", cache_dir=None), make_tokenizer())


def test_empty_response_in_messages(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": " "}],
           "rejected": "Go."}
    assert one_bad(tmp_path, [GOOD, row]) == (2, "empty", "chosen[0].content", "chosen[0].content is empty")


def test_non_string_message_content(tmp_path):
    row = {"prompt": [{"role": "user", "content": ["Hi"]}], "chosen": "A", "rejected": "B"}
    assert one_bad(tmp_path, [row, GOOD]) == (1, "non_string", "prompt[0].content",
                                              "prompt[0].content is list, expected a string")


def test_identical_responses_in_ranked(tmp_path):
    row = {"prompt": "Hi", "responses": ["A", "B", "A"], "scores": [3, 2, 1]}
    ok = {"prompt": "Hi", "responses": ["A", "B"], "scores": [3, 2]}
    assert one_bad(tmp_path, [ok, row]) == (2, "identical", "responses", "responses 0 and 2 are identical")


def test_ranked_ties_and_too_few(tmp_path):
    rows = [{"prompt": "Hi", "responses": ["A", "B"], "scores": [2, 2]}, {"prompt": "Hi", "responses": ["A"],
                                                                         "scores": [1]},
            {"prompt": "Yo", "responses": ["A", "B"], "scores": [1, 2]}]  # one usable row
    _, report = load_groups(DataConfig(write(tmp_path, rows), cache_dir=None, on_bad_row="skip"), make_tokenizer())
    assert [(b.row, b.kind) for b in report.bad_rows] == [(1, "no_pair"), (2, "too_few_responses")]


def test_json_array_not_object_line(tmp_path):
    assert one_bad(tmp_path, [GOOD, "[1, 2]"]) == (2, "malformed_json", "-", "a list, not a JSON object")


def test_too_long_rows_under_truncation_error(tmp_path):
    row = {"prompt": "Hi", "chosen": "one two three four five six seven eight nine ten " * 3, "rejected": "No."}
    assert one_bad(tmp_path, [GOOD, row], max_length=60, truncation="error")[:3] == (2, "too_long", "prompt/responses")


def test_prompt_filling_max_length_is_bad(tmp_path):
    row = {"prompt": "one two three four five six seven eight nine ten " * 5, "chosen": "A", "rejected": "B"}
    assert one_bad(tmp_path, [GOOD, row], max_length=40) == (
        2, "too_long", "prompt", "the prompt has 96 tokens, leaving no room for a response within max_length=40")


def test_unsupported_role_for_template_is_a_bad_row(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "chosen": "A", "rejected": "B"}
    _, report = load_groups(DataConfig(write(tmp_path, [GOOD, row]), cache_dir=None, on_bad_row="skip"),
                            make_tokenizer("gemma"))
    assert [(b.row, b.kind, b.column) for b in report.bad_rows] == [(2, "template_rejects", "prompt")]
    assert "System role not supported" in report.bad_rows[0].reason


def test_csv_rows_are_numbered_without_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nHi,Hello,Bye\nHi,Same,Same\n")
    with pytest.raises(DataError, match=r"d.csv: row 2, column chosen/rejected: chosen and rejected are identical"):
        load_groups(DataConfig(str(path), cache_dir=None), make_tokenizer())


def test_no_usable_rows_is_one_line_whatever_the_cache_holds(tmp_path):
    """Every row bad, skipped: a DataError naming the reasons, on the first call and on the second
    (which once read an empty cached result and failed inside datasets with an IndexError)."""
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "same", "rejected": "same"}) + "\n" for p in "ab"))
    cfg = DataConfig(str(data), on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    for _ in range(2):
        with pytest.raises(DataError) as e:
            load_groups(cfg, make_tokenizer())
        assert str(e.value) == (f"{data}: no usable rows: 2 read, by reason {{'identical': 2}}. Fix the data, or "
                                "check split, format and column_map")


def test_responses_that_truncation_makes_identical_are_filtered_and_reported(tmp_path):
    """Two responses that differ only past ``max_length`` would train as an identical pair (no
    signal, loss ln 2 for ever): the row is filtered, named in the report with the fix."""
    same = "one two three four five six seven eight nine ten " * 3
    row = {"prompt": "Hi", "chosen": same + "yes", "rejected": same + "no"}
    groups, report = load_groups(DataConfig(write(tmp_path, [GOOD, row]), cache_dir=None, max_length=40),
                                 make_tokenizer())
    assert report.rows_kept == 1 and not report.bad_rows
    assert [(b.row, b.kind, b.column) for b in report.filtered] == [(2, "identical_when_truncated", "responses")]
    assert "identical within max_length=40 (they differ after it)" in report.summary()
    groups, report = load_groups(DataConfig(write(tmp_path, [GOOD, row]), cache_dir=None, max_length=80),
                                 make_tokenizer())
    assert report.rows_kept == 2 and not report.filtered and report.truncated == 0
    _, report = load_groups(DataConfig(write(tmp_path, [GOOD, row]), cache_dir=None, max_length=40, pairs=False),
                            make_tokenizer())  # SFT trains the first response only: the row stays
    assert report.rows_kept == 2 and not report.filtered and report.truncated == 1
