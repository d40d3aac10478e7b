"""Shared test helpers: tiny random models of each architecture and an independent oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prefixpo.modeling import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]



def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random fp32 model of ``arch`` with eager attention (the literal standard recipe)."""
    return load_model(str(CONFIGS / f"tiny-{arch}.json"), seed=seed, attn_implementation="eager").eval()


def oracle_token_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Per-token log-probs ``[len(response)]`` of ``response`` after ``prompt``: one unpadded
    sequence through the model's own forward and logits, shifted the standard way."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logps = F.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
    return logps[len(prompt) - 1:]


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param
