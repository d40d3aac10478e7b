"""The standard recipe, as an oracle: every prompt+response its own right-padded sequence through the
model's own attention and logits. ``prefixpo verify``, the self-check of an unverified
architecture and the tests compare the prefix-shared path against it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prefixpo.layout import Group

# Tolerances: summed log-probs (absolute) and gradients (relative to the largest entry of each
# parameter's reference gradient). fp32 sums may differ by 1e-4, or by 1e-6 per scored token
# where that is larger: a log-prob of ~12 nats (vocab 128k) carries ~1e-6 of fp32 rounding, so
# long responses of large-vocabulary models exceed a flat 1e-4 by rounding alone
# (docs/verification.md). bf16 bounds are looser: the two paths round differently in bf16.
TOLERANCES = {
    torch.float32: {"logps": 1e-4, "logps_per_token": 1e-6, "grads": 1e-4},
    torch.bfloat16: {"logps_per_token": 2e-2, "grads": 1e-1},
    torch.float16: {"logps_per_token": 1e-2, "grads": 1e-1},
}


def random_groups(vocab_size: int, num_groups: int, num_responses: int, seed: int,
                  max_prompt: int = 150, max_response: int = 140) -> list[Group]:
    """Random groups whose lengths vary from one token up to past a 128-token block."""
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high + 1, (1,), generator=gen))
        return torch.randint(0, vocab_size, (n,), generator=gen).tolist()

    groups = []
    for i in range(num_groups):
        prompt = draw(1, 1) if i == 0 else draw(1, max_prompt)  # the first group has a one-token prompt
        responses = [draw(1, 1) if (i == 1 and j == 0) else draw(1, max_response) for j in range(num_responses)]
        groups.append(Group(prompt, responses))
    return groups


def separate_logps(model: nn.Module, groups: Sequence[Group]) -> list[torch.Tensor]:
    """The standard recipe: every prompt+response its own right-padded sequence; per-token
    log-probs ``[L]`` of each response, in group then response order."""
    sequences, spans = [], []
    for g in groups:
        for r in g.response_ids:
            sequences.append(list(g.prompt_ids) + list(r))
            spans.append((len(g.prompt_ids), len(r)))
    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
    logps = F.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return [logps[i, p - 1 : p - 1 + n] for i, (p, n) in enumerate(spans)]
