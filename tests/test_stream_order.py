"""Properties of the pure ordering functions: the contract every loader guarantee rests on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.dataloader.order import Deal, EpochOrder, consumed, rank_samples, rank_units
from stoker.errors import ConfigError

shard_rows = st.lists(st.integers(0, 30), min_size=1, max_size=8)


def delivered(rows, seed, epoch, window, start, block, world, workers, drop_last, shuffle=True):
    """Global sample ids each (rank, worker) delivers, computed the way the dataset does."""
    order = EpochOrder(np.asarray(rows), seed, epoch, shuffle, window)
    offsets = np.concatenate([[0], np.cumsum(rows)])
    out = {}
    for rank in range(world):
        for worker in range(workers):
            deal = Deal(order.total, start, block, rank, world, worker, workers, drop_last)
            shards, local = order.locate(deal.positions(deal.units()))
            out[rank, worker] = offsets[shards] + local
    return out


@settings(max_examples=60, deadline=None)
@given(rows=shard_rows, seed=st.integers(0, 99), window=st.integers(1, 50), block=st.integers(1, 7),
       world=st.integers(1, 4), workers=st.integers(1, 3))
def test_every_sample_exactly_once_over_ranks_and_workers(rows, seed, window, block, world, workers):
    got = np.concatenate(list(delivered(rows, seed, 0, window, 0, block, world, workers, False).values()))
    assert np.array_equal(np.sort(got), np.arange(sum(rows)))


@settings(max_examples=60, deadline=None)
@given(rows=shard_rows, window=st.integers(1, 50), block=st.integers(1, 7), world=st.integers(1, 4),
       workers=st.integers(1, 3))
def test_drop_last_gives_every_rank_the_same_full_batches(rows, window, block, world, workers):
    parts = delivered(rows, 3, 1, window, 0, block, world, workers, True)
    per_rank = [sum(len(parts[r, w]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] % block == 0
    got = np.concatenate(list(parts.values()))
    assert len(np.unique(got)) == len(got)  # no repeats
    assert sum(rows) - len(got) < block * world  # only the tail that cannot fill a round is dropped
    assert per_rank[0] == rank_samples(sum(rows), block, 0, world, True)


def test_order_is_deterministic_per_seed_and_changes_per_epoch():
    rows = np.array([50, 50, 50, 50])
    a = EpochOrder(rows, 7, 0, True, 64).locate(np.arange(200))
    b = EpochOrder(rows, 7, 0, True, 64).locate(np.arange(200))
    c = EpochOrder(rows, 7, 1, True, 64).locate(np.arange(200))
    d = EpochOrder(rows, 8, 0, True, 64).locate(np.arange(200))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0] * 100 + a[1], c[0] * 100 + c[1])
    assert not np.array_equal(a[0] * 100 + a[1], d[0] * 100 + d[1])


def test_unshuffled_order_is_manifest_order():
    shards, rows = EpochOrder(np.array([3, 0, 2]), 0, 5, False, 2).locate(np.arange(5))
    assert shards.tolist() == [0, 0, 0, 2, 2] and rows.tolist() == [0, 1, 2, 0, 1]


def test_window_shuffle_keeps_reads_inside_the_window():
    order = EpochOrder(np.full(20, 100), 1, 0, True, 250)
    for k in range(8):
        shards, _ = order.locate(np.arange(k * 250, min((k + 1) * 250, 2000)))
        assert set(shards.tolist()) <= set(order.window_shards(k).tolist())
        assert len(order.window_shards(k)) <= 4  # 250 samples span at most 4 shards of 100


@settings(max_examples=60, deadline=None)
@given(rows=shard_rows, data=st.data())
def test_checkpoint_prefix_resumes_under_any_world_workers_and_batch_size(rows, data):
    """Deliver k rounds under one layout, resume the rest under another: together, every sample once."""
    total = sum(rows)
    block1, world1 = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    block2, world2, workers2 = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k = data.draw(st.integers(0, rank_units(total, block1, world1 - 1, world1, False)))
    order = EpochOrder(np.asarray(rows), 4, 2, True, 9)
    first = []
    for rank in range(world1):  # every rank delivered its first k units
        deal = Deal(total, 0, block1, rank, world1)
        first.append(deal.positions(deal.units()[:k]))
    done = consumed(0, k, block1, world1, total)
    rest = delivered(rows, 4, 2, 9, done, block2, world2, workers2, False)
    offsets = np.concatenate([[0], np.cumsum(rows)])
    shards, local = order.locate(np.concatenate(first) if first else np.zeros(0, np.int64))
    got = np.concatenate([offsets[shards] + local, *rest.values()])
    assert np.array_equal(np.sort(got), np.arange(total))
    assert np.array_equal(np.sort(np.concatenate(first)), np.arange(done))  # the delivered set is a prefix


def test_rank_units_matches_deal_and_bad_layouts_are_config_errors():
    for remaining in range(0, 30):
        for world in (1, 2, 3):
            units = [len(Deal(remaining, 0, 4, r, world).units()) for r in range(world)]
            assert units == [rank_units(remaining, 4, r, world, False) for r in range(world)]
            assert sum(rank_samples(remaining, 4, r, world, False) for r in range(world)) == remaining
    with pytest.raises(ConfigError):
        Deal(10, 11, 1)
    with pytest.raises(ConfigError):
        Deal(10, 0, 1, rank=2, world=2)
    with pytest.raises(ConfigError):
        EpochOrder(np.array([1]), 0, 0, True, 0)
