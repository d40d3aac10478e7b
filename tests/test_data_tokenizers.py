"""Tokenizers built locally (no hub) in the styles of common chat templates, and the round-trip
test: prompt ids + response ids equal the template's tokenization of the whole conversation."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefixpo.data.formats import Example
from prefixpo.data.tokenize import describe_tokenizer, tokenize_examples

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>"]
# The Llama-3 pre-tokenizer split: newlines form their own pieces, so "\n\n" before a turn's text
# is one piece both when it ends the prompt and inside the whole conversation.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "chatml": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
               "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                "[/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}"
                "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}<start_of_turn>{{ role }}\n"
              "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
              "<start_of_turn>model\n{% endif %}"),
}
TOKENS = {  # style -> (bos, eos, whether the tokenizer itself adds BOS)
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", True),
    "chatml": (None, "<|im_end|>", False),
    "mistral": ("<s>", "</s>", True),
    "gemma": ("<bos>", "<eos>", True),
    "plain": ("<s>", "</s>", True),
    "plain_nobos": (None, "</s>", False),
}


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                           use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = (FIXTURES / "corpus.txt").read_text()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 3, trainer)
    return tok.to_str()


def make_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer in a given style: ``llama3``, ``chatml``, ``mistral``,
    ``gemma`` (with that chat template), ``plain`` (no template, adds BOS) or ``plain_nobos``."""
    tok = Tokenizer.from_str(_trained())
    bos, eos, adds_bos = TOKENS[style]
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                  unk_token="<unk>")
    out.chat_template = TEMPLATES.get(style)
    return out


CONVERSATIONS = [
    Example([{"role": "user", "content": "What is seven plus five?"}],
            [[{"role": "assistant", "content": "Seven plus five is twelve."}],
             [{"role": "assistant", "content": "It is eleven."}]]),
    Example([{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Glimmer."},
             {"role": "user", "content": "Which way does it flow?\n\nBe brief."}],
            [[{"role": "assistant", "content": "North."}], [{"role": "assistant", "content": "I am not sure."}]]),
]


@pytest.mark.parametrize("style", ["llama3", "chatml", "mistral", "gemma"])
def test_template_round_trip(style):
    tok = make_tokenizer(style)
    info = describe_tokenizer(tok, None)
    assert info.template_messages and not info.template_text
    for ex, (prompt, responses) in zip(CONVERSATIONS, tokenize_examples(CONVERSATIONS, tok, info), strict=True):
        for turns, response in zip(ex.responses, responses, strict=True):
            full = tok.apply_chat_template(ex.prompt + turns, tokenize=False)
            assert prompt + response == tok(full, add_special_tokens=False)["input_ids"]
            assert response  # every response has tokens
        bos = tok.bos_token_id
        if bos is not None:
            assert prompt[0] == bos and prompt.count(bos) == 1  # BOS once, never doubled
    # the end of a turn is where the template puts it
    ends = {"llama3": ["<|eot_id|>"], "chatml": ["<|im_end|>", "\n"], "mistral": ["</s>"],
            "gemma": ["<end_of_turn>", "\n"]}[style]
    _, responses = tokenize_examples(CONVERSATIONS[:1], tok, info)[0]
    assert tok.convert_ids_to_tokens(responses[0])[-len(ends):] == [tok.convert_ids_to_tokens(
        tok(e, add_special_tokens=False)["input_ids"])[0] for e in ends]


@pytest.mark.parametrize("style", ["plain", "plain_nobos"])
def test_plain_round_trip(style):
    tok = make_tokenizer(style)
    info = describe_tokenizer(tok, None)
    assert not info.template_messages
    ex = Example("Question: What is seven plus five?\nAnswer:", [" Seven plus five is twelve.", " Eleven."])
    prompt, responses = tokenize_examples([ex], tok, info)[0]
    for text, response in zip(ex.responses, responses, strict=True):
        # the whole text tokenized by the tokenizer itself (with its BOS), then EOS
        assert prompt + response == tok(ex.prompt + text)["input_ids"] + [tok.eos_token_id]
    assert prompt.count(tok.convert_tokens_to_ids("<s>")) == (1 if style == "plain" else 0)


def test_plain_messages_render_as_transcript():
    tok = make_tokenizer("plain")
    info = describe_tokenizer(tok, None)
    ex = CONVERSATIONS[0]
    prompt, responses = tokenize_examples([ex], tok, info)[0]
    assert tok.decode(prompt + responses[0]) == ("<s>\n\nHuman: What is seven plus five?\n\nAssistant: "
                                                 "Seven plus five is twelve.</s>")
