"""Every format, from its fixture file, to groups: responses in order (chosen/best first), scores."""

from __future__ import annotations

import datasets
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer

from prefixpo.data import DataConfig, DataError, load_groups, parse_row, resolve_columns

datasets.disable_progress_bars()


def load(name: str, style: str = "chatml", **options):
    return load_groups(DataConfig(str(FIXTURES / name), cache_dir=None, **options), make_tokenizer(style))


def decode_responses(tok, group):
    return [tok.decode(r, skip_special_tokens=True).strip() for r in group.response_ids]


@pytest.mark.parametrize("name, fmt, first_responses", [
    ("explicit_strings.jsonl", "explicit", ["Seven plus five is twelve.", "It is eleven."]),
    ("explicit_messages.jsonl", "explicit", ["In Beepish, hello is beep boop.", "I do not know Beepish."]),
    ("implicit_messages.jsonl", "implicit", ["It flows north.", "Rivers do not flow."]),
    ("implicit_hh.jsonl", "implicit", ["Blue light scatters away, so orange remains.",
                                       "Because the sun is made of oranges."]),
    ("ranked_completions.jsonl", "ranked", ["A flurp has six soft legs.", "A flurp is small and has six soft legs.",
                                            "A flurp is a bird.", "Flurp."]),
    ("ranked_parallel.jsonl", "ranked", ["beep boop", "boop beep", "hello"]),
    ("pairwise_shp.jsonl", "pairwise", ["Call it Brave Puddle.", "Boat."]),
    ("sft_prompt_completion.jsonl", "sft", ["Seven plus five is twelve."]),
    ("sft_messages.jsonl", "sft", ["You are welcome."]),
])
def test_format_detected_and_tokenized(name, fmt, first_responses):
    tok = make_tokenizer("chatml")
    groups, report = load_groups(DataConfig(str(FIXTURES / name), cache_dir=None), tok)
    assert report.format == fmt and report.rows_kept == report.rows_read == len(groups)
    assert decode_responses(tok, groups[0]) == first_responses
    prompt = tok.decode(groups[0].prompt_ids)
    if "messages" in name:  # chat messages go through the template: the prompt ends with the generation prompt
        assert report.tokens == "chat template" and prompt.endswith("<|im_start|>assistant\n")
    else:  # strings are raw text, as in TRL: no template, each response ends with EOS
        assert report.tokens.startswith("raw text (strings are not templated") and "<|im_start|>" not in prompt
        assert all(r[-1] == tok.eos_token_id for r in groups[0].response_ids)


def test_explicit_format_named_matches_detection():
    a, _ = load("explicit_strings.jsonl", format="explicit")
    b, _ = load("explicit_strings.jsonl")
    assert list(a) == list(b)


def test_implicit_split_at_last_shared_turn():
    tok = make_tokenizer("chatml")
    groups, _ = load("implicit_messages.jsonl")
    prompt = tok.decode(groups[0].prompt_ids)
    assert "The river Glimmer." in prompt and "Which way does it flow?" in prompt  # shared turns in the prompt
    hh, _ = load("implicit_hh.jsonl")
    assert "The little lighthouse." in tok.decode(hh[1].prompt_ids)
    assert decode_responses(tok, hh[1]) == ["Twice every minute.", "Never."]


def test_ranked_scores_best_first():
    groups, _ = load("ranked_completions.jsonl")
    assert list(groups[0].scores) == [9.5, 8.0, 2.0, 1.0]
    assert list(groups[1].scores) == [10.0, 3.0]
    assert len(groups[0].response_ids) == 4


def test_pairwise_label_orders_and_scores_follow():
    tok = make_tokenizer("chatml")
    groups, report = load("pairwise_shp.jsonl")
    assert report.columns["prompt"] == "history" and report.columns["label"] == "labels"
    assert list(groups[1].scores) == [5.0, 4.0]  # label 0: B first
    assert decode_responses(tok, groups[1])[0] == "Yes, much bigger than Ash, Bell or Crumb."


def test_pairwise_min_score_ratio_filters_and_reports():
    groups, report = load("pairwise_shp.jsonl", min_score_ratio=2.0)
    assert len(groups) == 2 and report.rows_kept == 2
    assert [(b.row, b.kind, b.reason) for b in report.filtered] == [
        (2, "score_ratio", "score ratio 1.25 is below min_score_ratio 2")]


def test_sft_group_has_one_response():
    groups, _ = load("sft_messages.jsonl")
    assert all(len(g.response_ids) == 1 for g in groups)
    groups, _ = load("sft_prompt_completion.jsonl", "plain")
    tok = make_tokenizer("plain")
    assert tok.decode(groups[0].prompt_ids + groups[0].response_ids[0]) == \
        "<s>What is seven plus five?Seven plus five is twelve.</s>"


def test_column_map():
    groups, report = load("custom_columns.jsonl", column_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert report.format == "explicit" and len(groups) == 2


def test_column_map_to_missing_column_is_named():
    """Every mapping to a column the data lacks is an error naming it and the data's columns, even
    one that detection would not need (``prompt`` on data whose prompt is implicit in the
    responses): it would otherwise be ignored, and a conversational file then fails on every row
    for another reason. Mappings of the other kind of data (preference names on an SFT file) are
    left alone: one ``--column-map`` serves every stage of a run."""
    with pytest.raises(DataError, match="column_map maps 'chosen' to 'best', which is not a column"):
        load("custom_columns.jsonl", column_map={"prompt": "question", "chosen": "best", "rejected": "bad"})
    with pytest.raises(DataError, match=r"^column_map maps 'prompt' to 'question', which is not a column \(the "
                                        r"columns are \['chosen', 'rejected'\]\); map to one of them"):
        load("implicit_hh.jsonl", column_map={"prompt": "question"})
    # a mapping for the other kind of data (a preference stage's, on an SFT stage's file) is not this file's
    groups, report = load("sft_messages.jsonl", column_map={"chosen": "good"})
    assert report.format == "sft" and len(groups) > 0


def test_role_map():
    row = {"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]}
    ex = parse_row(row, "sft", {"messages": "messages"}, role_map={"human": "user", "gpt": "assistant"})
    assert ex.prompt == [{"role": "user", "content": "Hi"}]


def test_explicit_chosen_with_prompt_included_is_stripped():
    u = [{"role": "user", "content": "Q"}]
    row = {"prompt": u, "chosen": u + [{"role": "assistant", "content": "A"}],
           "rejected": u + [{"role": "assistant", "content": "B"}]}
    _, cols = resolve_columns(list(row), "auto", {})
    ex = parse_row(row, "explicit", cols)
    assert ex.responses == [[{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]]


def test_explicit_strings_become_turns_when_any_part_is_messages():
    row = {"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}
    ex = parse_row(row, "explicit", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})
    assert ex.prompt == [{"role": "user", "content": "Q"}]
    assert ex.responses[1] == [{"role": "assistant", "content": "B"}]
