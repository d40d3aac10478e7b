import random

import pytest

from prefixpo.bench.profiles import DEFAULT_PROFILES, load_profiles, sample_lengths
from prefixpo.layout import Group
from prefixpo.packing import (
    PackingConfig,
    bucket_lengths,
    check_lengths,
    fit_group,
    pack,
    packing_stats,
    row_length,
    split_rows_over_ranks,
)


def random_lengths(n, seed, high=900):
    rng = random.Random(seed)
    return [rng.randint(2, high) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("capacity, window", [(1024, 7), (1024, 1000), (2048, 50)])
def test_rows_respect_capacity_and_hold_every_group_once(seed, capacity, window):
    lengths = random_lengths(300, seed)
    rows = pack(lengths, capacity, seed=seed, window=window)
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))  # every group exactly once, none split


def test_order_is_reproducible_per_seed_and_changes_per_epoch():
    lengths = random_lengths(200, 0)
    assert pack(lengths, 2048, seed=3) == pack(lengths, 2048, seed=3)
    assert pack(lengths, 2048, seed=3) != pack(lengths, 2048, seed=4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_equal_row_counts_balanced_tokens_and_every_group_once(world_size):
    lengths = random_lengths(500, world_size, high=600)
    rows = pack(lengths, 2048, seed=0, window=100)
    per_rank = split_rows_over_ranks(rows, lengths, world_size, seed=0)
    assert len({len(r) for r in per_rank}) == 1  # same number of steps on every rank
    flat = sorted(i for rank in per_rank for row in rank for i in row)
    assert flat == list(range(len(lengths)))
    tokens = [sum(lengths[i] for row in rank for i in row) for rank in per_rank]
    assert max(tokens) - min(tokens) <= 2048  # within one row of each other


def test_buckets():
    assert bucket_lengths(8192, 4) == [2048, 4096, 6144, 8192]
    assert row_length(2049, bucket_lengths(8192, 4)) == 4096
    with pytest.raises(ValueError):
        row_length(9000, [8192])


def test_capacity_must_be_a_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        PackingConfig(capacity=1000)


def test_too_long_groups_are_named_truncated_or_dropped():
    groups = [Group([1] * 60, [[2] * 20, [3] * 30]), Group([1] * 200, [[2] * 10, [3] * 10])]
    with pytest.raises(ValueError, match="group 1 has 220 tokens"):
        check_lengths(groups, PackingConfig(capacity=128))
    kept, truncated, dropped = check_lengths(groups, PackingConfig(capacity=128, truncation="truncate"))
    assert truncated == [1] and dropped == [] and kept[1].num_tokens == 128
    kept, truncated, dropped = check_lengths(groups, PackingConfig(capacity=128, truncation="drop"))
    assert dropped == [1] and len(kept) == 1


def test_fit_group_shortens_responses_before_the_prompt():
    g = fit_group(Group(list(range(10)), [[1] * 5, [2]]), 8)
    assert [len(r) for r in g.response_ids] == [1, 1] and g.prompt_ids == list(range(4, 10))


@pytest.mark.parametrize("name", ["capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback"])
def test_fill_ratio_at_8192_is_at_least_95_percent(name):
    profiles = load_profiles(DEFAULT_PROFILES)
    lengths = sample_lengths(profiles["profiles"][name], 512, seed=0)
    groups = [Group([0] * p, [[0] * r for r in rs]) for p, rs in lengths]
    config = PackingConfig(capacity=8192)
    rows = pack([g.num_tokens for g in groups], config.capacity, seed=0, window=config.window)
    stats = packing_stats(groups, rows, config)
    print(name, stats.as_dict())
    assert stats.fill_ratio >= 0.95
    assert stats.sharing_saving > 1.0


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world_size, micro, accum", [(1, 1, 1), (2, 2, 3), (3, 1, 4)])
def test_epoch_plan_trains_every_group_once_with_equal_steps_per_rank(packed, world_size, micro, accum):
    from prefixpo.packing import plan_epoch

    lengths = random_lengths(157, 1, high=400)
    config = PackingConfig(capacity=1024, window=40) if packed else None
    plans = [plan_epoch(lengths, seed=5, epoch=2, packing=config, micro_batch_size=micro,
                        gradient_accumulation_steps=accum, world_size=world_size, rank=r)
             for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1  # no rank waits at the end of the epoch
    assert len({tuple(len(step) for step in p) for p in plans}) == 1
    seen = sorted(i for p in plans for step in p for mb in step for row in mb for i in row)
    assert seen == list(range(len(lengths)))
    for p in plans:
        for step in p:
            assert len(step) <= accum and all(len(mb) <= micro for mb in step)
            if packed:
                assert all(sum(lengths[i] for i in row) <= 1024 for mb in step for row in mb)
    again = plan_epoch(lengths, seed=5, epoch=2, packing=config, world_size=world_size)
    other = plan_epoch(lengths, seed=5, epoch=3, packing=config, world_size=world_size)
    assert again == plan_epoch(lengths, seed=5, epoch=2, packing=config, world_size=world_size)
    assert other != again


@pytest.mark.parametrize("packed", [True, False])
def test_a_step_trains_the_same_groups_however_its_global_batch_is_split(packed):
    from prefixpo.packing import plan_epoch

    lengths = random_lengths(157, 2, high=400)
    config = PackingConfig(capacity=1024, window=40) if packed else None

    def groups_per_step(world_size, micro, accum):
        plans = [plan_epoch(lengths, seed=1, epoch=0, packing=config, micro_batch_size=micro,
                            gradient_accumulation_steps=accum, world_size=world_size, rank=r)
                 for r in range(world_size)]
        return [sorted(i for p in plans for mb in p[s] for row in mb for i in row) for s in range(len(plans[0]))]

    want = groups_per_step(1, 1, 4)  # 4 rows per optimizer step
    assert len(want) > 3
    assert groups_per_step(2, 1, 2) == want
    assert groups_per_step(4, 1, 1) == want
    assert groups_per_step(2, 2, 1) == want


def test_auto_capacity_comes_from_the_training_batch_not_the_eval_batch():
    """``packing_capacity: auto`` is the training micro-batch size times the longest training group
    (at least the longest eval group): a larger eval batch does not make training rows larger."""
    from types import SimpleNamespace

    from prefixpo.layout import Group
    from prefixpo.trainer import row_layout

    cfg = SimpleNamespace(packing=True, packing_capacity="auto", per_device_train_batch_size=1,
                          per_device_eval_batch_size=8, gradient_accumulation_steps=8, prefix_sharing=True, seed=0,
                          packing_num_buckets=4)
    train = [Group([1] * 600, [[2] * 100, [3] * 100])] * 16  # 800 tokens each
    longer_eval = [Group([1] * 1000, [[2] * 50, [3] * 50])] * 4  # 1100 tokens each
    assert row_layout(cfg, train, [], world=1)[0] == 896
    capacity, buckets = row_layout(cfg, train, longer_eval, world=1)
    assert capacity == 1152 and buckets[-1] == 1152


def test_packing_stats_pads_to_a_multiple_without_buckets():
    from prefixpo.layout import Group

    groups = [Group([1] * 100, [[2] * 10, [3] * 20]), Group([1] * 300, [[2] * 40, [3] * 50])]  # 130 and 390 tokens
    rows = [[0], [1]]
    config = PackingConfig(capacity=1024)
    assert packing_stats(groups, rows, config, [256, 1024]).padded_tokens == 256 + 1024
    assert packing_stats(groups, rows, config, [256, 1024], multiple_of=128).padded_tokens == 256 + 512
    assert packing_stats(groups, rows, config, multiple_of=8).padded_tokens == 136 + 392


@pytest.mark.parametrize("value", [-1, 2.5, True, "4"])
def test_packing_num_buckets_must_be_a_count(value):
    from prefixpo.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="`packing_num_buckets`: must be a number of row lengths, or 0 for rows "
                                          "padded to any multiple of 128"):
        TrainConfig(model_name_or_path="m", dataset="d.jsonl", packing_num_buckets=value).validate()


def test_static_compiled_layers_need_bucketed_rows():
    from prefixpo.config import ConfigError, TrainConfig

    for explicit in ({"packing_num_buckets": 0}, {}):  # 0 is the default
        with pytest.raises(ConfigError, match=r"`torch_compile_dynamic`: false compiles a graph per row length, and "
                                              r"packing_num_buckets: 0 \(the default\) makes rows of any length"):
            TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_dynamic=False, **explicit).validate()
    TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_dynamic=False, packing_num_buckets=4).validate()


def test_a_compile_mode_is_one_torch_compile_knows():
    from prefixpo.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="`torch_compile_mode`: must be one of default, reduce-overhead, "
                                          "max-autotune, max-autotune-no-cudagraphs, got 'fast'"):
        TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_mode="fast").validate()
    TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_mode="reduce-overhead").validate()


def test_eager_numerics_is_true_or_false():
    from prefixpo.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="`torch_compile_eager_numerics`: must be true or false, got 'yes'"):
        TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_eager_numerics="yes").validate()
    TrainConfig(model_name_or_path="m", dataset="d.jsonl", torch_compile_eager_numerics=False).validate()


def test_rows_of_any_length_warm_the_shortest_row_and_the_quantiles():
    """``packing_num_buckets: 0``: the lengths the warm-up runs are the quantiles of the first
    epoch's rows, the capacity, and the shortest row (a compiled graph guarded on a length range is
    then met below and above any one threshold before step 1); with buckets, the buckets alone."""
    from prefixpo.config import TrainConfig
    from prefixpo.layout import Group, round_up
    from prefixpo.packing import data_buckets
    from prefixpo.trainer import epoch_plans, group_lengths, row_layout

    groups = [Group([1] * n, [[2] * 5, [3] * 7]) for n in (3, 300, 400, 500, 600, 700, 800, 900)]
    for buckets in (0, 3):
        cfg = TrainConfig(model_name_or_path="m", dataset="d.jsonl", per_device_train_batch_size=1,
                          packing_num_buckets=buckets, max_length=1024)
        cfg.validate()
        capacity, lengths = row_layout(cfg, groups, [], world=1)
        sizes = group_lengths(groups, cfg)
        used = [sum(sizes[i] for i in row) for plan in epoch_plans(groups, cfg, 0, 1, capacity)
                for step in plan for mb in step for row in mb]
        quantiles = data_buckets(used, capacity, buckets or 4)
        assert lengths == (sorted({round_up(min(used), 128), *quantiles}) if buckets == 0 else quantiles)
        assert lengths[-1] == capacity and (buckets or lengths[0] == 128 < quantiles[0])
