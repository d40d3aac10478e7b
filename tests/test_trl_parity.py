"""prefixpo's prompt and response ids equal those of TRL's DPOTrainer for the same rows.

TRL (a test-only dependency, pinned in the ``dev`` extra) prepares the datasets itself: a real
``DPOTrainer`` on a tiny random Llama tokenizes them (prompt extraction, EOS, chat template,
dropping rows whose prompt fills ``max_length``), and its own collator truncates. prefixpo loads the
same rows from JSON lines with ``load_groups``. Cases, on a Llama-3 style tokenizer (adds BOS) and
a ChatML one (no BOS): plain strings with an explicit prompt (one response already ending with
the EOS text, one prompt ending inside a word, so tokens merge across the boundary) and an
implicit prompt (Anthropic-HH transcripts); chat messages with an explicit and an implicit prompt.
Each both without limits and with ``max_length`` (TRL's only limit: ``keep_start``, per sequence).

Deliberate differences, not exercised here (docs/data.md, "Same tokens as TRL"): prefixpo stops on a
template whose prompt is not a prefix of the conversation (TRL warns and splits where they
diverge); a prompt that alone fills ``max_length`` is a bad row in prefixpo (TRL drops it
silently; here ``on_bad_row: skip`` lists it); an HH pair whose responses start with the same
characters is split at the turn by prefixpo, inside the shared characters by TRL.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pytest

trl = pytest.importorskip("trl")

from test_data_tokenizers import make_tokenizer  # noqa: E402

from prefixpo.data import DataConfig, load_groups  # noqa: E402

datasets.disable_progress_bars()
MAX_LENGTH = 48
LONG = " ".join(["one two three four five six seven eight nine ten"] * 6)
EOS = "{eos}"  # replaced by the tokenizer's EOS text


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


RIVER = [_user("Name a river."), _bot("The Glimmer."), _user("Which way does it flow?")]
CASES: dict[str, list[dict[str, Any]]] = {
    "strings": [
        {"prompt": "Question: What is seven plus five?\nAnswer:", "chosen": " Seven plus five is twelve.",
         "rejected": " It is eleven."},
        {"prompt": "Name a river.", "chosen": " The Glimmer." + EOS, "rejected": " I am not sure."},  # EOS once
        {"prompt": "Which way does the river fl", "chosen": "ow? North.", "rejected": "ow? South, I think."},
        {"prompt": "Count:", "chosen": " " + LONG, "rejected": " one two."},  # the response is truncated
        {"prompt": LONG, "chosen": " Ten.", "rejected": " Six."},  # the prompt fills max_length
    ],
    "strings_implicit": [
        {"chosen": "\n\nHuman: What is seven plus five?\n\nAssistant: Twelve.",
         "rejected": "\n\nHuman: What is seven plus five?\n\nAssistant: It is eleven."},
        {"chosen": "\n\nHuman: Name a river.\n\nAssistant: The Glimmer.\n\nHuman: Which way does it flow?"
                   "\n\nAssistant: North.",
         "rejected": "\n\nHuman: Name a river.\n\nAssistant: The Glimmer.\n\nHuman: Which way does it flow?"
                     "\n\nAssistant: I am not sure."},
        {"chosen": "\n\nHuman: Count.\n\nAssistant: " + LONG, "rejected": "\n\nHuman: Count.\n\nAssistant: Two."},
    ],
    "messages": [
        {"prompt": [_user("What is seven plus five?")], "chosen": [_bot("Seven plus five is twelve.")],
         "rejected": [_bot("It is eleven.")]},
        {"prompt": RIVER, "chosen": [_bot("North.")], "rejected": [_bot("I am not sure.")]},
        {"prompt": [_user("Count.")], "chosen": [_bot(LONG)], "rejected": [_bot("Two.")]},
        {"prompt": [_user(LONG)], "chosen": [_bot("Ten.")], "rejected": [_bot("Six.")]},
    ],
    "messages_implicit": [
        {"chosen": [_user("What is seven plus five?"), _bot("Twelve.")],
         "rejected": [_user("What is seven plus five?"), _bot("It is eleven.")]},
        {"chosen": [*RIVER, _bot("North.")], "rejected": [*RIVER, _bot("I am not sure.")]},
        {"chosen": [_user("Count."), _bot(LONG)], "rejected": [_user("Count."), _bot("Two.")]},
    ],
}


def _rows(name: str, eos: str) -> list[dict[str, Any]]:
    """The case's rows, numbered (``id``, from 1 like prefixpo's line numbers), with the EOS text filled in."""
    text = json.dumps(CASES[name]).replace(EOS, eos)
    return [{**row, "id": i} for i, row in enumerate(json.loads(text), start=1)]


def _trl_rows(trainer: Any, name: str) -> dict[int, dict[str, Any]]:
    """TRL's prepared rows (prompt_ids, chosen_ids, rejected_ids) by id: what its dataset preparation keeps."""
    prepared = trainer.eval_dataset[name]
    return {row["id"]: row for row in prepared}


def _truncated(trainer: Any, row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """Prompt and response ids of one prepared row after TRL's collator (``max_length``, ``keep_start``)."""
    batch = trainer.data_collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    prompts, responses = [], []
    for ids, keep, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                     strict=True):
        ids, completion = ids[keep.bool()].tolist(), completion[keep.bool()].tolist()
        prompts.append([t for t, c in zip(ids, completion, strict=True) if not c])
        responses.append([t for t, c in zip(ids, completion, strict=True) if c])
    assert prompts[0] == prompts[1]  # keep_start cuts the end: both sequences keep the whole prompt
    return prompts[0], responses


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tokenizer style: the jsonl files, and a DPOTrainer that prepared every case."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(request.param)
    tmp = tmp_path_factory.mktemp(f"parity-{request.param}")
    paths = {}
    for name in CASES:
        paths[name] = tmp / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in _rows(name, tok.eos_token)))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), max_length=MAX_LENGTH, report_to="none", use_cpu=True)
    evals = {name: datasets.Dataset.from_list(_rows(name, tok.eos_token)) for name in CASES}
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=evals["strings"],
                             eval_dataset=evals, processing_class=tok)
    return {"tok": tok, "paths": paths, "trainer": trainer}


def _prefixpo(path: Path, tok: Any, **options: Any) -> tuple[dict[int, Any], Any]:
    groups, report = load_groups(DataConfig(str(path), cache_dir=None, on_bad_row="skip", **options), tok)
    rows = groups.dataset["row"]
    return {row: groups[i] for i, row in enumerate(rows)}, report


@pytest.mark.parametrize("name", list(CASES))
def test_same_ids_as_trl(setup: dict[str, Any], name: str) -> None:
    tok, trainer = setup["tok"], setup["trainer"]
    ours, report = _prefixpo(setup["paths"][name], tok)
    assert report.tokens.startswith("chat template" if name.startswith("messages") else "raw text")
    theirs = _trl_rows(trainer, name)
    for i, row in theirs.items():  # TRL kept these rows (it drops prompts that fill max_length)
        assert list(ours[i].prompt_ids) == row["prompt_ids"], (name, i)
        assert [list(r) for r in ours[i].response_ids] == [row["chosen_ids"], row["rejected_ids"]], (name, i)
    if name == "strings":
        # the response that ended with the EOS text has it once
        assert ours[2].response_ids[0][-2:] != [tok.eos_token_id] * 2
        assert ours[2].response_ids[0][-1] == tok.eos_token_id
        # "fl" + "ow?" merge: the prompt keeps only the tokens it shares with the whole texts
        assert len(ours[3].prompt_ids) < len(tok(CASES[name][2]["prompt"])["input_ids"])


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_ids_as_trl_with_max_length(setup: dict[str, Any], name: str, truncation: str) -> None:
    """With only ``max_length``, both of prefixpo's modes keep the prompt and cut the responses'
    ends: TRL's ``keep_start`` (its only mode) per sequence."""
    tok, trainer = setup["tok"], setup["trainer"]
    ours, report = _prefixpo(setup["paths"][name], tok, max_length=MAX_LENGTH, truncation=truncation)
    theirs = _trl_rows(trainer, name)
    # the rows TRL drops (the prompt alone fills max_length) are prefixpo's bad rows
    assert sorted(theirs) == sorted(ours)
    assert {b.row for b in report.bad_rows} == {row["id"] for row in _rows(name, tok.eos_token)} - set(theirs)
    assert all(b.kind == "too_long" for b in report.bad_rows)
    cut = 0
    for i, row in theirs.items():
        prompt, responses = _truncated(trainer, row)
        assert list(ours[i].prompt_ids) == prompt, (name, i)
        assert [list(r) for r in ours[i].response_ids] == responses, (name, i)
        cut += responses != [row["chosen_ids"], row["rejected_ids"]]
    assert cut == report.truncated >= 1  # the case truncates something
