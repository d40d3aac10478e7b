import pytest
import torch
import torch.nn.functional as F

from prefixpo.layout import Group, build_batch, layout_group
from prefixpo.masks import dense_mask, flex_block_mask


def rule(batch, b, q, k, window=None):
    """The attention rule of docs/design.md section 1, written out with plain Python on one (row, query, key)."""
    doc, seg, pos = (t[b].tolist() for t in (batch.document_ids, batch.segment_ids, batch.position_ids))
    if k > q or doc[q] != doc[k]:
        return False
    if seg[k] != 0 and seg[k] != seg[q]:
        return False
    return window is None or pos[q] - pos[k] < window


def sample_batch():
    gen = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(0, 50, (k,), generator=gen).tolist()

    groups = [Group(ids(3), [ids(2), ids(4), ids(1)]), Group(ids(1), [ids(3)]), Group(ids(5), [ids(2), ids(2)])]
    return build_batch([[layout_group(groups[0]), layout_group(groups[1])], [layout_group(groups[2])]],
                       pad_to_multiple_of=8)


@pytest.mark.parametrize("window", [None, 3])
def test_dense_mask_is_the_rule(window):
    batch = sample_batch()
    mask = dense_mask(batch, sliding_window=window)
    rows, length = batch.shape
    assert mask.shape == (rows, 1, length, length) and mask.dtype == torch.bool
    for b in range(rows):
        for q in range(length):
            for k in range(length):
                assert bool(mask[b, 0, q, k]) == rule(batch, b, q, k, window), (b, q, k)


def test_mask_really_differs_from_causal():
    batch = sample_batch()
    mask = dense_mask(batch)[:, 0]
    causal = torch.ones_like(mask[0]).tril()
    assert not torch.equal(mask[0], causal)
    # sibling responses never see each other: response 2 of group 0 (tokens 5..8) skips response 1 (3..4)
    assert not mask[0, 5:9, 3:5].any()
    assert mask[0, 5:9, 0:3].all()
    # groups in one row never see each other
    assert not mask[0, 10:, :10].any()


def test_no_row_of_the_mask_is_empty():
    assert dense_mask(sample_batch()).any(-1).all()


@pytest.mark.parametrize("window", [None, 3])
def test_flex_attention_equals_dense_attention_on_cpu(window):
    from torch.nn.attention.flex_attention import flex_attention

    batch = sample_batch()
    rows, length = batch.shape
    q, k, v = torch.randn(3, rows, 2, length, 8, dtype=torch.float64).unbind(0)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(batch, window))
    block_mask = flex_block_mask(batch, window, block_size=8)
    flex = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(flex, dense, rtol=1e-10, atol=1e-10)


def test_block_mask_skips_empty_blocks():
    # four groups of 16 tokens in one row: blocks across groups hold no allowed pair
    groups = [layout_group(Group(list(range(8)), [list(range(4)), list(range(4))])) for _ in range(4)]
    batch = build_batch([groups])
    block_mask = flex_block_mask(batch, block_size=8)
    visited = int(block_mask.kv_num_blocks.sum())
    if block_mask.full_kv_num_blocks is not None:
        visited += int(block_mask.full_kv_num_blocks.sum())
    dense_blocks = dense_mask(batch)[0, 0].reshape(8, 8, 8, 8).any(dim=(1, 3))
    assert visited == int(dense_blocks.sum())
    assert visited < 8 * 9 // 2  # a plain causal mask visits 36 blocks


def test_the_compiled_block_mask_builder_is_one_graph_for_every_row_length():
    """The GPU's mask builder (``torch.compile`` of the builder, its row length dynamic), run on the
    CPU: the same blocks as the eager builder at three row lengths, one graph per window, no
    recompile from one length to the next (a static first compile would recompile at the second)."""
    from prefixpo.modeling import compiled_graphs

    gen = torch.Generator().manual_seed(1)
    before = compiled_graphs()
    for window in (None, 40):
        for length in (256, 384, 640):
            groups = []
            while sum(g.num_tokens for g in groups) < length - 70:
                ids = torch.randint(1, 50, (30,), generator=gen).tolist()
                groups.append(Group(ids[:12], [ids[12:20], ids[20:]]))
            batch = build_batch([[layout_group(g) for g in groups]], row_length=length)
            eager = flex_block_mask(batch, window, compiled=False)
            built = flex_block_mask(batch, window, compiled=True)
            assert built.shape == eager.shape == (1, 1, length, length)
            assert torch.equal(built.to_dense(), eager.to_dense()), (window, length)
    assert compiled_graphs() - before == 2
