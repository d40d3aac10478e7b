"""prefixpo: preference training of causal LMs with prefix sharing and packing."""

from prefixpo.layout import Batch, Group, build_batch, collate_groups, layout_group
from prefixpo.logprobs import ResponseLogps, scored_token_logprobs
from prefixpo.modeling import apply_prefix_attention, build_attention_masks, compute_logps, forward_hidden

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Group",
    "ResponseLogps",
    "apply_prefix_attention",
    "build_attention_masks",
    "build_batch",
    "collate_groups",
    "compute_logps",
    "forward_hidden",
    "layout_group",
    "scored_token_logprobs",
]
