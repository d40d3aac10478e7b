import pytest
import torch

from prefixpo.layout import PAD_DOCUMENT, Group, build_batch, collate_groups, layout_group


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


def test_row_overflow_is_an_error():
    with pytest.raises(ValueError, match="more than its length"):
        build_batch([[layout_group(Group([1, 2], [[3, 4]]))]], row_length=3)


def test_collate_pads_to_multiple():
    batch = collate_groups([Group([1], [[2]]), Group([1, 2, 3], [[4, 5]])], pad_to_multiple_of=8)
    assert batch.shape == (2, 8)
