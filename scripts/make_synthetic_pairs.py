"""Synthetic preference rows with a benchmark profile's lengths (``prefixpo/bench/profiles.json``),
as text: the data of the GPU training runs, scripts/gpu_train_run.sh (docs/training.md "A short run
on the GPU") and scripts/gpu_multi_run.sh (docs/benchmarks.md "Several GPUs").

Words come from the quickstart tokenizer's vocabulary (one word = one token), so the rows go
through the real data pipeline (chat template, tokenization) with the profile's token lengths.
From the repository root:

    PYTHONPATH=src python scripts/make_synthetic_pairs.py --profile capybara --out pairs.jsonl [--num 512]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from prefixpo.bench.profiles import load_profiles, sample_lengths

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="capybara")
    parser.add_argument("--profiles", default=None)
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    vocab = json.loads((ROOT / "examples/quickstart/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if w.isalpha()]
    profiles = load_profiles(args.profiles)
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for prompt, (chosen, rejected) in sample_lengths(profiles["profiles"][args.profile], args.num, args.seed):
            def text(n: int) -> str:
                return " ".join(rng.choice(words) for _ in range(n))
            # chat-template tokens take ~8 of the prompt's budget
            f.write(json.dumps({"prompt": text(max(prompt - 8, 1)), "chosen": text(max(chosen - 2, 1)),
                                "rejected": text(max(rejected - 2, 1))}) + "\n")


if __name__ == "__main__":
    main()
