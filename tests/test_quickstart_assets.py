"""The quickstart assets in examples/quickstart: the tokenizer loads offline, its chat template goes
through the data pipeline, every data row loads, eval prompts are in no training file, the model
config matches the tokenizer, and the generator reproduces the committed files.

The learnability run (SFT then DPO, about a minute on 2 CPU cores) is opt-in:
``PREFIXPO_QUICKSTART_TRAIN=1 python -m pytest tests/test_quickstart_assets.py -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixpo.data import DataConfig, load_groups
from prefixpo.layout import collate_groups

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
DATA = QUICKSTART / "data"
FILES = {"sft_train": "sft", "pref_train": "explicit", "pref_eval": "explicit"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QUICKSTART / "tokenizer", local_files_only=True)


def rows(name: str) -> list[dict]:
    with open(DATA / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_special_tokens_and_no_unknown_words(tokenizer):
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for name in FILES:
        for row in rows(name):
            for text in (v for k, v in row.items()):
                assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_chat_template_round_trips_through_the_pipeline(tokenizer, tmp_path):
    """With use_chat_template (as examples/quickstart.yaml sets: the data are strings), prompt ids +
    response ids are exactly the template's tokenization of the conversation, with BOS once and the
    response ending in EOS (<|end|>)."""
    prompt, chosen, rejected = "which is larger: 3 or 7?", "7 is bigger .", "3 is bigger ."
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    groups, report = load_groups(DataConfig(str(path), use_cache=False, use_chat_template=True), tokenizer)
    assert report.rows_kept == 1 and report.tokens == "chat template"
    group = groups[0]
    for response, text in zip(group.response_ids, (chosen, rejected)):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert list(group.prompt_ids) + list(response) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response, skip_special_tokens=True) == text
    ids = list(group.prompt_ids)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


@pytest.mark.parametrize("name", list(FILES))
def test_data_files_load_with_no_bad_rows(tokenizer, name):
    groups, report = load_groups(DataConfig(str(DATA / f"{name}.jsonl"), use_cache=False, use_chat_template=True),
                                 tokenizer)
    assert report.format == FILES[name]
    assert report.rows_read == report.rows_kept == len(rows(name)) and not report.bad_rows and not report.truncated
    expected_responses = 1 if name.startswith("sft") else 2
    assert all(len(g.response_ids) == expected_responses for g in groups)
    batch = collate_groups(list(groups), pad_token_id=tokenizer.pad_token_id)
    assert batch.shape[1] <= 64  # tiny sequences: the quickstart is meant to be fast on CPU


def test_sizes_and_eval_prompts_unseen_in_training():
    sft, train, evaluation = rows("sft_train"), rows("pref_train"), rows("pref_eval")
    assert len(sft) >= 300 and 300 <= len(train) <= 600 and 64 <= len(evaluation) <= 100
    eval_prompts = {r["prompt"] for r in evaluation}
    assert len(eval_prompts) == len(evaluation)
    assert not eval_prompts & {r["prompt"] for r in train}
    assert not eval_prompts & {r["prompt"] for r in sft}
    assert all(r["chosen"] != r["rejected"] for r in train + evaluation)
    assert sum(p.stat().st_size for p in QUICKSTART.rglob("*") if p.is_file()) < 1_000_000


def test_model_config_matches_the_tokenizer(tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(QUICKSTART / "model", local_files_only=True)
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert sorted(p.name for p in (QUICKSTART / "model").iterdir()) == ["config.json"]  # random init, no weights


def test_generator_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_quickstart.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            committed = QUICKSTART / path.relative_to(tmp_path)
            assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from the generator's output"


@pytest.mark.skipif(not os.environ.get("PREFIXPO_QUICKSTART_TRAIN"), reason="set PREFIXPO_QUICKSTART_TRAIN=1")
def test_sft_then_dpo_learns_the_task():
    out = subprocess.run([sys.executable, str(QUICKSTART / "learnability.py")], check=True, capture_output=True,
                         text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["eval_accuracy_before_dpo"] == 0.0  # the policy is the reference: every reward ties at 0
    assert report["eval_accuracy_after_dpo"] >= 0.85, report
