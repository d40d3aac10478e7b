"""Generate the quickstart assets: a made-up task, its word-level tokenizer and a tiny Llama config.

    python scripts/make_quickstart.py            # writes examples/quickstart/{data,tokenizer,model}

Deterministic (seeded, sorted vocabulary): running it again reproduces the committed files byte for
byte. The task is five small word games in natural-ish language, all compositional, so held-out
prompts (new word lists, new number pairs) can be answered by a model that learned the rule:

    prompt   "what is the last word in: red owl cup?"     chosen "the last word is cup ."
                                                         rejected "the last word is red ."

Every rejected answer is a plausible mistake (the other end of the list, the list not reversed, a
count off by one, the smaller number), so DPO has a consistent error to push down.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "quickstart"
SEED = 1234

WORDS = ["red", "blue", "green", "pink", "gold", "gray",
         "cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "frog", "goat",
         "cup", "hat", "box", "key", "pen", "map", "book", "lamp"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBERS = range(0, 21)  # "which is bigger" uses 0..20 as digits

SIZES = {"sft_train": 1200, "pref_train": 600, "pref_eval": 100}

# Special tokens. The chat template (ChatML-like, our own) writes BOS once, then every turn as
# <|role|> content <|end|>; <|end|> is also EOS, so a response ends by predicting it.
BOS, EOS, PAD, UNK = "<|bos|>", "<|end|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIALS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORD_PATTERN = r"\w+|[^\w\s]+"  # the tokenizer's pre-tokenizer (tokenizers' Whitespace)

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "use_cache": True,
}


# --- the task -----------------------------------------------------------------------------------

def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def last_word(rng: random.Random) -> tuple[str, str, str]:
    ws = _words(rng)
    ask = rng.choice(["what is the last word in: {}?", "which word comes last in: {}?", "name the last word of: {}."])
    return ask.format(" ".join(ws)), f"the last word is {ws[-1]} .", f"the last word is {ws[0]} ."


def first_word(rng: random.Random) -> tuple[str, str, str]:
    ws = _words(rng)
    ask = rng.choice(["what is the first word in: {}?", "which word comes first in: {}?", "name the first word of: {}."])
    return ask.format(" ".join(ws)), f"the first word is {ws[0]} .", f"the first word is {ws[-1]} ."


def reverse(rng: random.Random) -> tuple[str, str, str]:
    ws = rng.sample(WORDS, 3)
    ask = rng.choice(["reverse the words: {}.", "say these words backwards: {}."])
    wrong = list(ws) if rng.random() < 0.5 else ws[::-1][1:] + ws[-1:]  # not reversed, or one word misplaced
    return ask.format(" ".join(ws)), " ".join(ws[::-1]) + " .", " ".join(wrong) + " ."


def count(rng: random.Random) -> tuple[str, str, str]:
    ws = rng.sample(WORDS, rng.randint(2, 6))
    n = len(ws)
    ask = rng.choice(["how many words are in: {}?", "count the words: {}."])
    off = n + rng.choice([-1, 1])
    return (ask.format(" ".join(ws)), f"there are {NUMBER_WORDS[n]} words .", f"there are {NUMBER_WORDS[off]} words .")


def bigger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(NUMBERS, 2)
    ask = rng.choice(["which number is bigger, {} or {}?", "which is larger: {} or {}?"])
    return ask.format(a, b), f"{max(a, b)} is bigger .", f"{min(a, b)} is bigger ."


TASKS = [last_word, first_word, reverse, count, bigger]


def make_rows(seed: int = SEED) -> dict[str, list[tuple[str, str, str]]]:
    """Unique prompts, split into eval first (so eval prompts are in no training file), then the
    preference and SFT training sets (disjoint too). Tasks take turns, so every split is balanced."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str, str]]] = {}
    for name in ("pref_eval", "pref_train", "sft_train"):
        rows: list[tuple[str, str, str]] = []
        while len(rows) < SIZES[name]:
            row = TASKS[len(rows) % len(TASKS)](rng)
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
        splits[name] = rows
    return splits


def write_data(splits: dict[str, list[tuple[str, str, str]]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for prompt, chosen, rejected in rows:
                row = {"prompt": prompt, "completion": chosen} if name.startswith("sft") else \
                    {"prompt": prompt, "chosen": chosen, "rejected": rejected}
                f.write(json.dumps(row) + "\n")


# --- the tokenizer and the model config ---------------------------------------------------------

def vocabulary(splits: dict[str, list[tuple[str, str, str]]]) -> dict[str, int]:
    """Special tokens first, then every word of the task (all of them, not only those drawn),
    sorted, so the vocabulary does not depend on the sample."""
    words = set(WORDS) | set(NUMBER_WORDS) | {str(n) for n in NUMBERS}
    for rows in splits.values():
        for row in rows:
            for text in row:
                words.update(re.findall(WORD_PATTERN, text))
    return {tok: i for i, tok in enumerate(SPECIALS + sorted(words))}


def build_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # explicit identity post-processor (BOS/EOS come from the chat template), the same file whatever
    # the transformers version that wraps it
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=ROLE_TOKENS,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, directory: Path) -> None:
    """The three files written directly, not by ``save_pretrained`` (whose output differs between
    transformers 4.x and 5.x), in a form both load: the tokenizer, its config, the chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        stale.unlink()
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
              "additional_special_tokens": ROLE_TOKENS,
              "model_max_length": MODEL_CONFIG["max_position_embeddings"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def model_config(tokenizer) -> dict:
    return {**MODEL_CONFIG, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    splits = make_rows(args.seed)
    write_data(splits, args.out / "data")
    tokenizer = build_tokenizer(vocabulary(splits))
    save_tokenizer(tokenizer, args.out / "tokenizer")
    (args.out / "model").mkdir(parents=True, exist_ok=True)
    with open(args.out / "model" / "config.json", "w") as f:
        json.dump(model_config(tokenizer), f, indent=2, sort_keys=True)
        f.write("\n")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {args.out}: {sizes} rows; vocabulary {len(tokenizer)} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
