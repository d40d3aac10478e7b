"""Public datasets, written with their published column names and nesting, load with format: auto."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.data import DataConfig, DataError, load_groups

datasets.disable_progress_bars()
PUBLIC = FIXTURES / "public"


def load(name: str, **options):
    """Rows of a public schema, tokenized with the chat template for strings too, so every dataset's
    turns show in one form (raw text for strings, as TRL, is tests/test_trl_parity.py's)."""
    tok = make_tokenizer("chatml")
    options = {"use_chat_template": True, **options}
    groups, report = load_groups(DataConfig(str(PUBLIC / name), cache_dir=None, **options), tok)
    return tok, list(groups), report


def texts(tok, ids_list):
    return [tok.decode(r, skip_special_tokens=True).strip() for r in ids_list]


@pytest.mark.parametrize("name, fmt, prompt_has, responses, scores, pairs", [
    ("hh_rlhf.jsonl", "implicit", ["keep basil alive", "Water it when the soil is dry.", "How often"],
     ["About twice a week indoors.", "Never water basil."], None, None),
    ("ultrafeedback_binarized.jsonl", "explicit (ultrafeedback_binarized)", ["haiku about frost"],
     ["White lace on the pane", "Frost is cold.", "Morning glass of stars"], [8.0, 4.0, 7.0], [[0, 1], [2, 1]]),
    ("trl_ultrafeedback_binarized.jsonl", "implicit (ultrafeedback_binarized)", ["prime above ten"],
     ["Eleven.", "Twelve."], [9.0, 2.0], [[0, 1]]),
    ("capybara_dpo.jsonl", "explicit (capybara_dpo)", ["Plan a picnic.", "Bring bread", "And if it rains?"],
     ["Move it under the bandstand.", "Cancel everything forever."], [5.0, 2.0], [[0, 1]]),
    ("stack_exchange_preferences.jsonl", "ranked (stack_exchange)", ["reverse a list in Snek"],
     ["Call lst.flip().", "Slice it backwards.", "Lists cannot be reversed."], [5.0, 2.0, -1.0], None),
    ("orca_dpo_pairs.jsonl", "explicit (orca_dpo_pairs)", ["<|im_start|>system\nYou are a careful assistant.",
                                                           "What is 6 times 7?"],
     ["6 times 7 is 42.", "It is 36."], None, None),
    ("shp.jsonl", "pairwise (shp)", ["Why does my bread not rise?"],
     ["Your yeast may be dead.", "Bread never rises.", "Knead it longer."], [40.0, 4.0, 10.0],
     [[0, 1], [0, 2], [2, 1]]),
    ("ultrafeedback.jsonl", "ranked (ultrafeedback)", ["Describe a rainbow"],
     ["A bow of seven colours after rain.", "Colours arching across the sky.", "Wet light."], [8.5, 7.0, 3.0], None),
    ("tldr_preference.jsonl", "explicit", ["SUBREDDIT: r/pets", "POST: Every day he steals one."],
     ["Dog steals socks daily.", "I like pets."], None, None),
    ("summarize_from_feedback.jsonl", "pairwise (summarize_from_feedback)",
     ["SUBREDDIT: r/relationships\nTITLE: Lonely after moving\nPOST: I moved", "TL;DR:"],
     ["Moved cities, feel alone.", "City is big.", "New in town, no friends yet."], None, [[0, 1], [2, 1]]),
    ("nectar.jsonl", "ranked (nectar)", ["<|im_start|>user\nHello", "<|im_start|>assistant\nHi! How can I help?",
                                         "Suggest a name for a goldfish."],
     ["Bubbles.", "Goldie or Finn.", "Fish."], [-1.0, -2.0, -3.0], None),
    ("pku_saferlhf.jsonl", "pairwise (pku_saferlhf)", ["How do I pick a lock?"],
     ["Use a hairpin on any door you like.", "Call a locksmith if it is your own lock."], None, None),
])
def test_public_schema_loads_as_published(name, fmt, prompt_has, responses, scores, pairs):
    tok, groups, report = load(name)
    assert report.format == fmt
    assert f"format {fmt}," in report.summary()
    g = groups[0]
    prompt = tok.decode(g.prompt_ids)
    for part in prompt_has:
        assert part in prompt
    assert prompt.endswith("<|im_start|>assistant\n")  # every response starts as an assistant turn
    assert texts(tok, g.response_ids) == responses
    assert (list(g.scores) if g.scores is not None else None) == scores
    assert (list(map(list, g.pairs)) if g.pairs is not None else None) == pairs


def test_ultrafeedback_tie_keeps_the_published_pair_and_scores():
    tok, groups, report = load("ultrafeedback_binarized.jsonl")
    assert report.rows_read == 3 and len(groups) == 2 and report.merge.rows == 2 and report.merge.groups == 1
    tie = groups[1]
    assert list(tie.scores) == [6.0, 6.0] and list(map(list, tie.pairs)) == [[0, 1]]
    assert texts(tok, tie.response_ids) == ["Yes, botanically it is a berry.", "No, it is a rock."]


def test_orca_empty_system_adds_no_turn():
    tok, groups, _ = load("orca_dpo_pairs.jsonl")
    assert "careful" not in tok.decode(groups[1].prompt_ids)
    assert tok.decode(groups[1].prompt_ids).count("<|im_start|>system") <= 1  # only the template's default


def test_shp_rows_merge_one_group_per_post_with_unchanged_pairs():
    tok, merged, report = load("shp.jsonl")
    _, separate, plain = load("shp.jsonl", merge_prompts=False)
    assert len(separate) == 4 and len(merged) == 2 and plain.merge.rows == 0
    assert report.merge.rows == 3 and report.merge.groups == 1
    assert report.merge.tokens_after < report.merge.tokens_before
    assert "merged 3 rows sharing a prompt into 1 groups" in report.summary()
    # the merged group's pairs, as texts, are exactly the rows' (preferred, other) pairs, in row order
    g = merged[0]
    names = texts(tok, g.response_ids)
    got = [(names[c], names[r]) for c, r in g.pairs]
    want = [tuple(texts(tok, s.response_ids)) for s in separate[:3]]
    assert got == want
    assert separate[0].prompt_ids == g.prompt_ids
    assert merged[1].pairs is None and merged[1].response_ids == separate[3].response_ids  # a single row stays as it is


def test_summarize_duplicate_response_computed_once():
    tok, groups, report = load("summarize_from_feedback.jsonl")
    assert len(groups) == 1 and len(groups[0].response_ids) == 3  # " City is big." is in both rows, kept once


def test_preference_column_selects_the_safer_response():
    tok, groups, _ = load("pku_saferlhf.jsonl", preference_column="safer_response_id")
    assert texts(tok, groups[0].response_ids)[0] == "Call a locksmith if it is your own lock."
    with pytest.raises(DataError, match="preference_column='safest' is not a column"):
        load("pku_saferlhf.jsonl", preference_column="safest")
    with pytest.raises(DataError, match="applies to PKU-SafeRLHF"):
        load("tldr_preference.jsonl", preference_column="better_response_id")


def test_schema_named_as_format_and_column_map_skips_detection():
    _, _, report = load("shp.jsonl", format="shp")
    assert report.format == "pairwise (shp)"
    _, _, generic = load("shp.jsonl", format="pairwise")
    assert generic.format == "pairwise"
    with pytest.raises(DataError, match="format 'nectar' needs the columns"):
        load("shp.jsonl", format="nectar")


def test_bad_nested_value_names_row_and_column(tmp_path):
    path = tmp_path / "se.jsonl"
    path.write_text('{"qid": 1, "question": "Q?", "answers": [{"text": "a", "pm_score": 1}, {"text": "b"}]}\n')
    with pytest.raises(DataError, match=r"line 1, column answers\[1\]"):
        load_groups(DataConfig(str(path), cache_dir=None), make_tokenizer("chatml"))


def test_prepare_reports_the_merge(tmp_path, capsys):
    from test_data_prepare import run, saved_tokenizer

    argv = ["--dataset", str(PUBLIC / "shp.jsonl"), "--tokenizer", saved_tokenizer(tmp_path),
            "--cache-dir", str(tmp_path / "cache")]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "format pairwise (shp), 4 rows read, 4 kept" in out and "merged 3 rows sharing a prompt into 1 groups" in out
    assert "groups               2 (5 responses)" in out
    assert run(argv + ["--json"]) == 0  # from the cache: the merge counts come back with it
    line = json.loads(capsys.readouterr().out)
    assert line["cache_hit"] and line["merge"]["rows"] == 3 and line["merge"]["groups"] == 1
    assert line["merge"]["tokens_before"] > line["merge"]["tokens_after"]
    assert run(argv + ["--json", "--no-merge-prompts"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["groups"] == 4
