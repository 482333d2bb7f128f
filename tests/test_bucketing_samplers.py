"""Properties of BucketBatchSampler and TokenBudgetBatchSampler, ranks simulated with explicit args."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoker.bucketing.collate import pad_collate
from stoker.bucketing.samplers import BucketBatchSampler, TokenBudgetBatchSampler, resolve_world
from stoker.errors import ConfigError, StateError

# Tiny random datasets on many ranks legitimately repeat samples; the warning is tested on its own below.
pytestmark = pytest.mark.filterwarnings("ignore:epoch .* samples repeated:UserWarning")

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

lengths_strategy = st.lists(st.integers(1, 300), min_size=1, max_size=250).map(lambda v: np.array(v, dtype=np.uint32))


@st.composite
def configs(draw):
    """A random sampler factory: (kind, lengths, kwargs) with a budget every sample fits."""
    lengths = draw(lengths_strategy)
    common = {
        "seed": draw(st.integers(0, 2**31)),
        "drop_last": draw(st.booleans()),
        "shuffle": draw(st.booleans()),
        "num_replicas": draw(st.integers(1, 5)),
    }
    if draw(st.booleans()):
        batch_size = draw(st.integers(1, 16))
        megabatch = batch_size * draw(st.integers(1, 8))
        return BucketBatchSampler, lengths, {"batch_size": batch_size, "megabatch": megabatch, **common}
    multiple = draw(st.sampled_from([1, 8, 64]))
    padded_max = -(-int(lengths.max()) // multiple) * multiple
    kwargs = {
        "max_tokens": padded_max * draw(st.integers(1, 6)) + draw(st.integers(0, multiple - 1)),
        "pad_to_multiple_of": multiple,
        "max_batch_size": draw(st.one_of(st.none(), st.integers(1, 20))),
        "megabatch": draw(st.integers(1, 120)),
        **common,
    }
    return TokenBudgetBatchSampler, lengths, kwargs


def per_rank(cls, lengths, kwargs, epoch=0):
    samplers = [cls(lengths, **kwargs, rank=r) for r in range(kwargs["num_replicas"])]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@SETTINGS
@given(configs(), st.integers(0, 3))
def test_every_sample_once_per_epoch_across_ranks(config, epoch):
    cls, lengths, kwargs = config
    samplers, batches = per_rank(cls, lengths, kwargs, epoch)
    world = kwargs["num_replicas"]
    counts = Counter(i for rank in batches for b in rank for i in b)
    assert all(b for rank in batches for b in rank), "no empty batches"
    assert len({len(rank) for rank in batches}) == 1, "every rank gets the same number of batches"
    assert all(len(rank) == len(s) for rank, s in zip(batches, samplers))
    repeated, dropped = samplers[0].repeated_samples, samplers[0].dropped_samples
    assert sum(counts.values()) == len(lengths) - dropped + repeated
    if kwargs["drop_last"]:
        assert repeated == 0 and max(counts.values(), default=1) == 1
    else:
        assert dropped == 0 and set(counts) == set(range(len(lengths)))
        assert repeated < world and sum(c - 1 for c in counts.values()) == repeated
        if repeated:  # only when there are too few samples for an equal batch count
            assert all(len(b) == 1 for rank in batches for b in rank)


@SETTINGS
@given(configs())
def test_batches_respect_size_and_budget(config):
    cls, lengths, kwargs = config
    samplers, batches = per_rank(cls, lengths, kwargs)
    flat = [b for rank in batches for b in rank]
    if cls is TokenBudgetBatchSampler:
        multiple = kwargs["pad_to_multiple_of"]
        for b in flat:
            padded = -(-int(lengths[b].max()) // multiple) * multiple
            assert len(b) * padded <= kwargs["max_tokens"]
            assert kwargs["max_batch_size"] is None or len(b) <= kwargs["max_batch_size"]
    else:
        assert all(len(b) <= kwargs["batch_size"] for b in flat)
        if kwargs["drop_last"]:
            assert all(len(b) == kwargs["batch_size"] for b in flat)
        else:  # one short batch per epoch, plus at most world - 1 split batches
            short = sum(len(b) < kwargs["batch_size"] for b in flat)
            assert short <= 1 + 2 * (kwargs["num_replicas"] - 1) or samplers[0].repeated_samples


@SETTINGS
@given(configs(), st.integers(0, 5))
def test_order_is_deterministic(config, epoch):
    cls, lengths, kwargs = config
    first = per_rank(cls, lengths, kwargs, epoch)[1]
    second = per_rank(cls, lengths.copy(), kwargs, epoch)[1]
    assert first == second


@SETTINGS
@given(configs(), st.data())
def test_exact_resume_mid_epoch(config, data):
    cls, lengths, kwargs = config
    kwargs = {**kwargs, "num_replicas": 1}
    sampler = cls(lengths, **kwargs, rank=0)
    sampler.set_epoch(2)
    full = list(sampler)
    k = data.draw(st.integers(0, len(full)))
    it = iter(sampler)
    head = [next(it) for _ in range(k)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == k
    resumed = cls(lengths, **kwargs, rank=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert head + list(resumed) == full
    assert list(resumed) == full, "the resume point applies to one iteration only"


def test_new_order_each_epoch_and_seed():
    lengths = np.random.default_rng(0).integers(1, 500, 2000)
    sampler = TokenBudgetBatchSampler(lengths, 4096)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1)), "batch contents change, not just their order"
    assert list(TokenBudgetBatchSampler(lengths, 4096, seed=1)) != epoch0


def test_no_shuffle_sorts_megabatches_in_place():
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4])
    sampler = BucketBatchSampler(lengths, 2, shuffle=False, megabatch=4)
    assert list(sampler) == [[2, 0], [3, 1], [6, 4], [7, 5]]
    sampler.set_epoch(3)
    assert list(sampler) == [[2, 0], [3, 1], [6, 4], [7, 5]]


def test_bucketing_pads_far_less_than_random_batches():
    lengths = np.random.default_rng(1).integers(1, 1000, 5000)
    bucketed = BucketBatchSampler(lengths, 16).padding_stats()
    random = BucketBatchSampler(lengths, 16, megabatch=16).padding_stats()  # one batch per megabatch: no bucketing
    assert bucketed.padding_fraction < 0.03 < 0.3 < random.padding_fraction
    budget = TokenBudgetBatchSampler(lengths, 8192).padding_stats()
    assert budget.padding_fraction < 0.03
    assert budget.real_tokens == int(lengths.sum()) and budget.rows == len(lengths)
    assert sum(budget.shapes.values()) == budget.batches
    assert all(rows * width <= 8192 for rows, width in budget.shapes)


def test_padding_stats_match_what_pad_collate_builds():
    lengths = np.random.default_rng(2).integers(1, 200, 300)
    sampler = TokenBudgetBatchSampler(lengths, 1024, pad_to_multiple_of=8, num_replicas=2, rank=1)
    samples = [{"tokens": np.ones(n, dtype=np.uint16), "length": int(n)} for n in lengths]
    collate = pad_collate(pad_to_multiple_of=8)
    for batch in sampler:
        out = collate([samples[i] for i in batch])
        assert out["input_ids"].numel() <= 1024
    expected = sampler.padding_stats()
    assert collate.stats.as_padding_stats() == expected
    assert collate.stats.shapes == expected.shapes


def test_world_sizes_larger_than_the_dataset_repeat_visibly():
    with pytest.warns(UserWarning, match="1 samples repeated"):
        samplers, batches = per_rank(BucketBatchSampler, np.array([3, 1, 2]), {"batch_size": 2, "num_replicas": 4})
    assert samplers[0].repeated_samples == 1
    assert [len(rank) for rank in batches] == [1, 1, 1, 1]
    config = {"batch_size": 1, "num_replicas": 4, "drop_last": True}
    dropped, kept = per_rank(BucketBatchSampler, np.array([3, 1, 2]), config)
    assert kept == [[], [], [], []] and dropped[0].dropped_samples == 3


def test_uneven_batches_are_split_not_repeated():
    lengths = np.full(10, 4)
    samplers, batches = per_rank(BucketBatchSampler, lengths, {"batch_size": 4, "num_replicas": 2, "seed": 3})
    sizes = sorted(len(b) for rank in batches for b in rank)
    assert sizes == [2, 2, 2, 4]  # 4, 4, 2 -> one 4 split in two
    assert samplers[0].repeated_samples == 0


def test_state_dict_with_explicit_count_for_prefetching_loaders():
    lengths = np.arange(1, 101)
    sampler = BucketBatchSampler(lengths, 8, seed=5)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(6):  # a DataLoader would pull ahead of the training step
        next(it)
    state = sampler.state_dict(batches_consumed=4)
    resumed = BucketBatchSampler(lengths, 8, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == full[4:]


def test_set_epoch_discards_resume_point():
    lengths = np.arange(1, 60)
    sampler = BucketBatchSampler(lengths, 4)
    state = {**sampler.state_dict(), "batches_consumed": 3}
    sampler.load_state_dict(state)
    assert sampler.state_dict()["batches_consumed"] == 3
    sampler.set_epoch(1)
    assert sampler.state_dict()["batches_consumed"] == 0
    assert len(list(sampler)) == len(sampler)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": 1}, "seed"),
        ({"num_replicas": 2}, "num_replicas"),
        ({"max_tokens": 512}, "max_tokens"),
        ({"megabatch": 7}, "megabatch"),
    ],
)
def test_loading_state_from_another_config_names_the_keys(change, key):
    lengths = np.arange(1, 100)
    base = {"max_tokens": 256, "seed": 0, "num_replicas": 1, "rank": 0, "megabatch": 50}
    state = TokenBudgetBatchSampler(lengths, **base).state_dict()
    other = TokenBudgetBatchSampler(lengths, **{**base, **change})
    with pytest.raises(StateError, match=key):
        other.load_state_dict(state)


def test_loading_state_checks_lengths_version_and_range():
    lengths = np.arange(1, 100)
    state = BucketBatchSampler(lengths, 4).state_dict()
    with pytest.raises(StateError, match="lengths_digest"):
        BucketBatchSampler(lengths[::-1], 4).load_state_dict(state)
    with pytest.raises(StateError, match="sampler"):
        TokenBudgetBatchSampler(lengths, 400).load_state_dict(state)
    with pytest.raises(StateError, match="version"):
        BucketBatchSampler(lengths, 4).load_state_dict({**state, "version": 99})
    with pytest.raises(StateError, match="batches_consumed"):
        BucketBatchSampler(lengths, 4).load_state_dict({**state, "batches_consumed": 1000})
    with pytest.raises(StateError, match="lacks keys"):
        BucketBatchSampler(lengths, 4).load_state_dict({"epoch": 0})


def test_rank_and_world_resolution(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_world() == (1, 0)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_world() == (4, 2)
    assert resolve_world(num_replicas=8) == (8, 2)
    assert resolve_world(num_replicas=2, rank=1) == (2, 1)
    sampler = BucketBatchSampler(np.arange(1, 50), 4)
    assert (sampler.num_replicas, sampler.rank) == (4, 2)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        resolve_world()
    with pytest.raises(ConfigError, match="rank"):
        resolve_world(num_replicas=2, rank=2)


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "kwargs", "match"),
    [
        ([4, 0, 2], 256, {}, "sample 1 has length 0"),
        ([4, -3], 256, {}, "sample 1 has length -3"),
        ([], 256, {}, "empty"),
        ([[1, 2]], 256, {}, "1-D"),
        ([1.5, 2.0], 256, {}, "integers"),
        ([10, 300, 20], 256, {}, r"sample 1 has length 300 \(padded to 304\), more than max_tokens=256"),
        ([10, 249, 20], 250, {}, r"sample 1 has length 249 \(padded to 256\), more than max_tokens=250"),
        ([1, 2], 256, {"max_batch_size": 0}, "max_batch_size"),
        ([1, 2], 256, {"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ([1, 2], 256, {"seed": -1}, "seed"),
        ([1, 2], 0, {}, "max_tokens"),
    ],
)
def test_bad_token_budget_input(lengths, max_tokens, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenBudgetBatchSampler(np.array(lengths), max_tokens, **kwargs)


def test_a_sample_exactly_at_the_budget_is_fine():
    sampler = TokenBudgetBatchSampler(np.array([10, 256, 20]), 256, seed=4)
    assert sorted(map(len, sampler)) == [1, 2]


def test_bad_bucket_input():
    with pytest.raises(ConfigError, match="multiple of batch_size"):
        BucketBatchSampler([1, 2, 3], 2, megabatch=3)
    with pytest.raises(ConfigError, match="batch_size"):
        BucketBatchSampler([1, 2, 3], 0)


def test_ten_million_lengths_plan_is_vectorised():
    """A 10M-sample plan completes quickly only without per-sample Python; timings are in the benchmark."""
    lengths = np.random.default_rng(0).integers(1, 2048, 10_000_000, dtype=np.uint32)
    sampler = TokenBudgetBatchSampler(lengths, 16384)
    assert len(sampler) > 10_000_000 * 1024 // 16384 // 2
