"""Synthetic groups with the benchmark length profiles of ``profiles.json`` (benchmarks and packing tests).

For a profile with median overall length ``m`` and prompt-to-response ratio ``q`` (overall =
prompt + mean response; ratio = prompt / mean response), the median prompt is ``m q / (1 + q)``
and the median response ``m / (1 + q)``. Each example draws its prompt and each response
independently, log-normally around those medians, clipped to ``[min_tokens, max_prompt]`` for the
prompt and ``[min_tokens, max_length - prompt]`` for a response. Token ids are uniform random.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

from prefixpo.layout import Group

DEFAULT_PROFILES = Path(__file__).resolve().parent / "profiles.json"  # shipped as package data


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The profiles file: ``path``, else ``$PREFIXPO_BENCH_PROFILES``, else the packaged ``profiles.json``."""
    path = Path(path or os.environ.get("PREFIXPO_BENCH_PROFILES") or DEFAULT_PROFILES)
    if not path.is_file():
        raise FileNotFoundError(f"no bench profiles at {path}; pass --profiles PATH or set PREFIXPO_BENCH_PROFILES")
    return json.loads(path.read_text())


def sample_lengths(profile: dict[str, Any], num_examples: int, seed: int, sigma: float = 0.5,
                   min_tokens: int = 8, num_responses: int = 2) -> list[tuple[int, list[int]]]:
    """``(prompt_length, [response_lengths])`` per example."""
    rng = random.Random(seed)
    ratio = profile["ratio"]
    median_prompt = profile["median_overall"] * ratio / (1 + ratio)
    median_response = profile["median_overall"] / (1 + ratio)

    def draw(median: float, upper: int) -> int:
        return int(min(max(round(rng.lognormvariate(math.log(median), sigma)), min_tokens), upper))

    out = []
    for _ in range(num_examples):
        prompt = draw(median_prompt, profile["max_prompt"])
        out.append((prompt, [draw(median_response, profile["max_length"] - prompt) for _ in range(num_responses)]))
    return out


def sample_groups(profiles: dict[str, Any], name: str, vocab_size: int, num_examples: int | None = None,
                  seed: int | None = None) -> list[Group]:
    """Random-token groups with the lengths of profile ``name``."""
    if name not in profiles["profiles"]:
        raise ValueError(f"unknown profile {name!r}; the profiles are: {', '.join(profiles['profiles'])}")
    defaults = profiles.get("defaults", {})
    num_examples = num_examples or defaults.get("num_examples", 512)
    seed = defaults.get("seed", 0) if seed is None else seed
    lengths = sample_lengths(profiles["profiles"][name], num_examples, seed, defaults.get("sigma", 0.5),
                             defaults.get("min_tokens", 8))
    rng = random.Random(seed + 1)

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    return [Group(ids(p), [ids(r) for r in rs]) for p, rs in lengths]
