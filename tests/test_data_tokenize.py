"""Template problems are errors that name the template; truncation keeps what it says it keeps."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data_tokenizers import FIXTURES, make_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefixpo.data import DataConfig, DataError, load_groups
from prefixpo.data.formats import Example, RowFiltered
from prefixpo.data.tokenize import describe_tokenizer, tokenize_examples, truncate

datasets.disable_progress_bars()
EXAMPLE = Example([{"role": "user", "content": "Hi"}], [[{"role": "assistant", "content": "Sure"}],
                                                         [{"role": "assistant", "content": "No"}]])


def test_template_whose_generation_prompt_is_not_a_prefix():
    tok = make_tokenizer("chatml")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    [err] = tokenize_examples([EXAMPLE], tok, describe_tokenizer(tok, None))
    assert err.kind == "template"
    assert "does not render the prompt (with the generation prompt) as a prefix" in err.reason
    assert "the texts differ at character 52 (prompt '\\n', conversation ': Sure<|im_end|>\\n')" in err.reason


def test_template_whose_tokens_merge_across_the_boundary_stops_even_under_skip(tmp_path):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "Hi": 1, "Bot": 2, "Sure": 3, "No": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    hf.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% else %}Bot"
                        "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}Bot{% endif %}")
    [err] = tokenize_examples([EXAMPLE], hf, describe_tokenizer(hf, None))
    assert "the texts agree but the token ids differ" in err.reason and "merges across the boundary" in err.reason
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Sure", "rejected": "No"}) + "\n")
    with pytest.raises(DataError, match="the chat template does not render the prompt"):
        load_groups(DataConfig(str(path), cache_dir=None, on_bad_row="skip", use_chat_template=True), hf)


def test_use_chat_template_without_one_is_a_config_error():
    with pytest.raises(DataError, match="tokenizer has no chat_template"):
        describe_tokenizer(make_tokenizer("plain"), True)


def test_plain_mode_on_a_templated_tokenizer():
    tok = make_tokenizer("llama3")
    info = describe_tokenizer(tok, False)
    prompt, responses = tokenize_examples([Example("Q:", [" A", " B"])], tok, info)[0]
    assert tok.convert_ids_to_tokens(prompt)[0] == "<|begin_of_text|>" and responses[0][-1] == tok.eos_token_id


def test_truncation_keeps_prompt_end_with_bos_or_start():
    prompt, responses = [1, 10, 11, 12, 13, 14], [[20, 21, 22, 23], [30]]
    assert truncate(prompt, responses, 7, 4, "keep_end", bos_id=1) == ([1, 12, 13, 14], [[20, 21, 22], [30]], True)
    assert truncate(prompt, responses, 7, 4, "keep_start", bos_id=1) == ([1, 10, 11, 12], [[20, 21, 22], [30]], True)
    assert truncate(prompt, responses, None, None, "keep_end") == (prompt, responses, False)
    assert truncate(prompt, responses, 10, None, "keep_end") == (prompt, responses, False)
    with pytest.raises(RowFiltered, match="exceed max_length=7"):
        truncate(prompt, responses, 7, None, "drop")


def test_truncation_counts_and_limits_through_the_pipeline():
    tok = make_tokenizer("plain")
    path = str(FIXTURES / "explicit_strings.jsonl")
    groups, report = load_groups(DataConfig(path, cache_dir=None, max_length=12, max_prompt_length=6), tok)
    assert report.truncated == 3 and report.rows_kept == 3
    for g in groups:
        assert len(g.prompt_ids) <= 6 and len(g.prompt_ids) + max(map(len, g.response_ids)) <= 12
        assert g.prompt_ids[0] == tok.bos_token_id
    groups, report = load_groups(DataConfig(path, cache_dir=None, max_length=18, truncation="drop"), tok)
    assert report.rows_kept == len(groups) == 1 and [(b.row, b.kind) for b in report.filtered] == [
        (2, "too_long"), (3, "too_long")]


@pytest.mark.parametrize("style, use_chat_template", [("plain", None), ("chatml", None), ("chatml", True)])
def test_a_response_ending_with_eos_gets_it_once(style, use_chat_template):
    """Raw text appends the EOS text only when missing (TRL's rule); under the template a string
    response's own trailing EOS gives way to the one the template writes."""
    tok = make_tokenizer(style)
    eos = tok.eos_token
    info = describe_tokenizer(tok, use_chat_template)
    prompt, (with_eos, without) = tokenize_examples([Example("Q: 2+2?", [" Four." + eos, " Five."])], tok, info)[0]
    for ids in (with_eos, without):
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens.count(eos) == 1 and tokens[-1 if use_chat_template is None else -2] == eos, tokens
        assert tokens[tokens.index(eos) - 1] == "."


def test_strings_are_raw_text_messages_use_the_template_and_the_report_says_so(tmp_path):
    tok = make_tokenizer("chatml")
    strings = {"prompt": "What is seven plus five?", "chosen": " Twelve.", "rejected": " Eleven."}
    messages = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yo"}],
                "rejected": [{"role": "assistant", "content": "No"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(strings) + "\n" + json.dumps(messages) + "\n")
    expected = {None: ("chat template for 1 row, raw text for 1", [False, True]),
                True: ("chat template", [True, True]), False: ("raw text", [False, False])}
    for use_chat_template, (tokens, templated) in expected.items():
        groups, report = load_groups(DataConfig(str(path), cache_dir=None, use_chat_template=use_chat_template), tok)
        assert report.tokens == tokens and f", tokens: {tokens}" in report.summary().splitlines()[0]
        assert ["<|im_start|>" in tok.decode(g.prompt_ids) for g in groups] == templated
    path.write_text(json.dumps(strings) + "\n")
    _, report = load_groups(DataConfig(str(path), cache_dir=None), tok)
    assert report.tokens == "raw text (strings are not templated; use_chat_template: true applies the chat template)"
