"""The ``separate`` mode: TRL's DPO recipe, the baseline the prefixpo modes are timed against.

Chosen and rejected responses are stacked as rows of their own, each prompt+response from
position 0, right-padded to the longest row of the micro-batch; the model runs its own attention
(transformers' ``sdpa`` with a 2-D padding mask); log-probs come from the full logits through
``log_softmax`` and a gather, as TRL's ``DPOTrainer`` computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefixpo.bench.layouts import MicroBatch
from prefixpo.layout import Group
from prefixpo.metrics import attention_pairs


@dataclass
class SeparateBatch:
    """TRL's layout: ``2k`` rows, chosen rows ``0..k-1`` then rejected rows ``k..2k-1``, each
    prompt+response from position 0, right-padded. ``input_ids``, ``attention_mask``,
    ``completion_mask``: ``[2k, T]``; ``prompt_lengths``, ``lengths``: ``[2k]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SeparateBatch:
        return SeparateBatch(**{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})


def separate_micro_batch(groups: Sequence[Group], pad_token_id: int = 0) -> MicroBatch:
    """TRL's concatenated batch of ``k`` pairs: ``2k`` right-padded rows (chosen rows, then rejected).

    >>> mb = separate_micro_batch([Group([1, 2], [[3], [4, 5]])])
    >>> mb.batch.input_ids.tolist(), mb.batch.completion_mask.int().tolist()
    ([[1, 2, 3, 0], [1, 2, 4, 5]], [[0, 0, 1, 0], [0, 0, 1, 1]])
    """
    rows = [(g.prompt_ids, g.response_ids[i]) for i in (0, 1) for g in groups]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    completion = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
        attention[i, :len(p) + len(r)] = 1
        completion[i, len(p):len(p) + len(r)] = True
    k = len(groups)
    batch = SeparateBatch(ids, attention, completion, torch.tensor([len(p) for p, _ in rows]),
                          torch.tensor([len(p) + len(r) for p, r in rows]))
    resp = torch.tensor([len(r) for _, r in rows])
    return MicroBatch(batch, torch.arange(k), torch.arange(k, 2 * k), resp[:k], resp[k:],
                      int(attention.sum()), ids.numel(), sum(attention_pairs(g, shared=False) for g in groups),
                      int(resp.sum()))


def separate_micro_batches(groups: Sequence[Group], micro_pairs: int) -> list[MicroBatch]:
    """The ``separate`` micro-batches of one step: ``micro_pairs`` pairs each."""
    return [separate_micro_batch(groups[i:i + micro_pairs]) for i in range(0, len(groups), micro_pairs)]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py): log-probs ``[B, T]`` of ``index`` under
    ``logits [B, T, V]``; fp32 by logsumexp row by row, other dtypes by log_softmax row by row.

    >>> logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    >>> selective_log_softmax(logits, torch.tensor([[0, 1]]))
    tensor([[-0.6931, -0.6931]])
    """
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def separate_batch_logps(model: nn.Module, batch: SeparateBatch) -> torch.Tensor:
    """Summed response log-probs ``[2k]`` the way TRL's DPOTrainer computes them: the model's own
    forward (2-D padding mask), full logits, shifted labels, completion mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.input_ids[:, 1:]
    token_logps = selective_log_softmax(logits[:, :-1], labels)
    return token_logps.masked_fill(~batch.completion_mask[:, 1:], 0.0).float().sum(-1)


def separate_step(policy: nn.Module, reference: nn.Module, micro_batches: Sequence[MicroBatch],
                  loss_fn: Callable, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``separate`` mode's forward+backward: the step's mean loss and the sum of the policy's
    chosen + rejected log-probs, as device tensors (no host sync)."""
    device = next(policy.parameters()).device
    loss_sum = torch.zeros((), device=device)
    logps_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        pi = separate_batch_logps(policy, mb.batch)
        with torch.no_grad():
            ref = separate_batch_logps(reference, mb.batch)
        c, r = mb.chosen_idx, mb.rejected_idx
        losses, _ = loss_fn(pi[c], pi[r], ref[c], ref[r], mb.chosen_len, mb.rejected_len)
        loss = losses.sum()
        (loss / num_pairs).backward()
        loss_sum += loss.detach()
        logps_sum += (pi[c] + pi[r]).detach().sum()
    return loss_sum / num_pairs, logps_sum
