import pytest
import torch

from prefixpo.layout import (
    MAX_RESPONSES,
    PAD_DOCUMENT,
    Group,
    build_batch,
    collate_groups,
    copy_together,
    layout_group,
)


def random_group(gen: torch.Generator, n: int) -> Group:
    def ids(k: int) -> list[int]:
        return torch.randint(0, 1000, (k,), generator=gen).tolist()

    return Group(ids(int(torch.randint(1, 9, (1,), generator=gen))),
                 [ids(int(torch.randint(1, 7, (1,), generator=gen))) for _ in range(n)])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_scored_token_is_predicted_by_its_separate_sequence_predecessor(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        group = random_group(gen, n)
        lay = layout_group(group)
        p = len(group.prompt_ids)
        k = 0
        for i, response in enumerate(group.response_ids):
            sequence = list(group.prompt_ids) + list(response)
            for j, token in enumerate(response):
                source = lay.scored_source[k]
                # the predicting state holds the previous token of prompt+response, at its position
                assert lay.input_ids[source] == sequence[p + j - 1]
                assert lay.position_ids[source] == p + j - 1
                assert lay.segment_ids[source] in (0, i + 1)
                assert lay.scored_targets[k] == token and lay.scored_response[k] == i
                k += 1
        assert k == len(lay.scored_targets) == sum(len(r) for r in group.response_ids)
        assert len(lay) == group.num_tokens


def test_no_token_is_duplicated():
    lay = layout_group(Group([5, 6, 7], [[1, 2], [3]]))
    assert lay.input_ids == [5, 6, 7, 1, 2, 3]


def test_token_counts():
    g = Group([1, 2, 3], [[4, 5], [6]])
    assert g.num_tokens == 6 and g.num_separate_tokens == 9


@pytest.mark.parametrize("group, message", [
    (Group([], [[1]]), "prompt of at least one token"),
    (Group([1], []), "at least one response"),
    (Group([1], [[2], []]), "response 1 of the group is empty"),
])
def test_bad_groups_are_refused(group, message):
    with pytest.raises(ValueError, match=message):
        layout_group(group)


def test_batch_indexes_scored_tokens_across_rows_and_packed_groups():
    gen = torch.Generator().manual_seed(0)
    groups = [random_group(gen, 2) for _ in range(5)]
    rows = [[layout_group(groups[0]), layout_group(groups[1])], [layout_group(groups[2])],
            [layout_group(g) for g in groups[3:]]]
    batch = build_batch(rows, pad_to_multiple_of=16)
    length = batch.shape[1]
    assert length % 16 == 0
    flat_ids = batch.input_ids.reshape(-1)
    flat_pos = batch.position_ids.reshape(-1)
    flat_doc = batch.document_ids.reshape(-1)
    r = 0
    for gi, g in enumerate(groups):
        for response in g.response_ids:
            sequence = list(g.prompt_ids) + list(response)
            mine = (batch.scored_response == r).nonzero().squeeze(1)
            assert batch.response_group[r] == gi and batch.response_lengths[r] == len(response)
            for j, s in enumerate(mine.tolist()):
                src = batch.scored_index[s]
                assert flat_ids[src] == sequence[len(g.prompt_ids) + j - 1]
                assert flat_pos[src] == len(g.prompt_ids) + j - 1
                assert flat_doc[src] == gi
                assert batch.scored_targets[s] == response[j]
            r += 1
    assert batch.num_groups == 5 and batch.num_responses == 10
    assert (batch.document_ids == PAD_DOCUMENT).sum() == batch.input_ids.numel() - sum(g.num_tokens for g in groups)


def test_a_group_with_more_responses_than_the_mask_codes_hold_is_refused():
    layout_group(Group([1], [[2]] * MAX_RESPONSES))
    with pytest.raises(ValueError, match="a group has 4096 responses; the attention mask holds at most 4095"):
        layout_group(Group([1], [[2]] * (MAX_RESPONSES + 1)))


def test_row_overflow_is_an_error():
    with pytest.raises(ValueError, match="more than its length"):
        build_batch([[layout_group(Group([1, 2], [[3, 4]]))]], row_length=3)


def test_collate_pads_to_multiple():
    batch = collate_groups([Group([1], [[2]]), Group([1, 2, 3], [[4, 5]])], pad_to_multiple_of=8)
    assert batch.shape == (2, 8)


def test_a_batch_travels_as_one_buffer_per_dtype_and_arrives_whole():
    """``Batch.to`` an accelerator copies one flat buffer per dtype and cuts it back into the
    fields: every field keeps its values, shape and dtype (the empty and the float ones too), and
    fields that are None stay None. Checked through ``copy_together`` to the CPU (values) and
    ``Batch.to("meta")`` (the path an accelerator takes: shapes, dtypes, device)."""
    groups = [Group([1, 2], [[3], [4, 5]], scores=[1.0, 0.0]), Group([6], [[7], [8], [9]], pairs=[[2, 0]]),
              Group([10, 11, 12], [[13, 14]])]
    batch = collate_groups(groups, pad_to_multiple_of=4)
    fields = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    assert {t.dtype for t in fields.values()} == {torch.long, torch.float32} and batch.group_ids is None
    copied = copy_together({**fields, "empty": torch.zeros(0, 3, dtype=torch.long)}, "cpu")
    for k, v in fields.items():
        assert copied[k].shape == v.shape and copied[k].dtype == v.dtype
        assert torch.equal(copied[k].nan_to_num(-1.0), v.nan_to_num(-1.0)), k
    assert copied["empty"].shape == (0, 3)
    moved = batch.to("meta")
    assert moved.position_ids.storage_offset() == batch.input_ids.numel()  # one buffer, the fields its views
    for k, v in vars(batch).items():
        if isinstance(v, torch.Tensor):
            assert moved.__dict__[k].device.type == "meta" and moved.__dict__[k].shape == v.shape, k
        else:
            assert moved.__dict__[k] == v, k
    assert batch.to("cpu").input_ids is batch.input_ids
