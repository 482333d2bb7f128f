"""BucketedStream: exactly-once emission, budgets, determinism, DataLoader workers, bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stoker.bucketing.collate import pad_collate
from stoker.bucketing.metrics import BatchStats
from stoker.bucketing.bucketed import BucketedStream
from stoker.errors import ConfigError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def samples(lengths):
    return [
        {"tokens": np.full(n, i % 50000, dtype=np.uint16), "length": int(n), "index": i} for i, n in enumerate(lengths)
    ]


@SETTINGS
@given(
    st.lists(st.integers(1, 100), min_size=0, max_size=200),
    st.integers(1, 64),
    st.one_of(st.builds(dict, max_tokens=st.integers(104, 600)), st.builds(dict, batch_size=st.integers(1, 12))),
    st.integers(0, 3),
)
def test_every_sample_exactly_once_within_budget(lengths, buffer_size, mode, seed):
    stream = BucketedStream(samples(lengths), buffer_size=buffer_size, seed=seed, **mode)
    batches = list(stream)
    assert Counter(s["index"] for b in batches for s in b) == Counter(range(len(lengths)))
    for batch in batches:
        assert batch
        if "max_tokens" in mode:
            padded = -(-max(s["length"] for s in batch) // 8) * 8
            assert len(batch) * padded <= mode["max_tokens"]
        else:
            assert len(batch) <= mode["batch_size"]
    again = BucketedStream(samples(lengths), buffer_size=buffer_size, seed=seed, **mode)
    assert [[s["index"] for s in b] for b in again] == [[s["index"] for s in b] for b in batches]


def test_epochs_and_seeds_change_the_order_and_buffers_cut_padding():
    lengths = np.random.default_rng(0).integers(1, 500, 2000).tolist()
    stream = BucketedStream(samples(lengths), batch_size=16, buffer_size=1024)
    first = [[s["index"] for s in b] for b in stream]
    stream.set_epoch(1)
    assert [[s["index"] for s in b] for b in stream] != first

    def padding(buffer_size):
        collate = pad_collate(pad_to_multiple_of=1)
        for batch in BucketedStream(samples(lengths), batch_size=16, buffer_size=buffer_size):
            collate(batch)
        return collate.stats.padding_fraction

    assert padding(1024) < 0.05 < 0.3 < padding(16)  # a 16-sample buffer is plain random batching


class WorkerShardedStream(IterableDataset):
    """An IterableDataset that splits itself among DataLoader workers, as StreamingDataset does."""

    def __init__(self, items):
        self.items = items
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(self.items[worker::workers])


@pytest.mark.parametrize("wrap", [list, WorkerShardedStream], ids=["plain-list", "iterable-dataset"])
def test_dataloader_workers_see_each_sample_once(wrap):
    lengths = np.random.default_rng(1).integers(1, 64, 300).tolist()
    stream = BucketedStream(wrap(samples(lengths)), max_tokens=256, buffer_size=50, seed=2)
    loader = DataLoader(stream, batch_size=None, collate_fn=pad_collate(), num_workers=2)
    stats = BatchStats()
    seen = []
    for batch in loader:
        assert batch["input_ids"].numel() <= 256 and batch["input_ids"].dtype == torch.int64
        stats.update(batch)
        seen += batch["lengths"].tolist()
    assert sorted(seen) == sorted(lengths)
    assert stats.real_tokens == sum(lengths) and stats.rows == len(lengths)


def test_set_epoch_is_forwarded_to_the_wrapped_dataset():
    inner = WorkerShardedStream(samples([3, 4]))
    BucketedStream(inner, batch_size=2).set_epoch(5)
    assert inner.epochs == [5]


@pytest.mark.parametrize(
    ("items", "kwargs", "match"),
    [
        (samples([3, 0]), {"batch_size": 2}, "stream sample 1 has no tokens"),
        ([{"tokens": np.ones(3), "length": 4}], {"batch_size": 2}, "stream sample 0: 'length' is 4 but it holds 3"),
        (samples([3, 300]), {"max_tokens": 256}, r"stream sample 1 has length 300 \(padded to 304\)"),
        (samples([3]), {}, "exactly one of max_tokens"),
        (samples([3]), {"batch_size": 2, "max_tokens": 8}, "exactly one of max_tokens"),
        (samples([3]), {"batch_size": 2, "buffer_size": 0}, "buffer_size"),
        (samples([3]), {"batch_size": 2, "max_batch_size": 4}, "max_batch_size"),
        (samples([3]), {"batch_size": 2, "seed": -1}, "seed"),
    ],
)
def test_bad_stream_input(items, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        list(BucketedStream(items, **kwargs))
