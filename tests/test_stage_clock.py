"""Per-stage clocks: `stage_times()` of the loader (workers included) and of a dataset iterated in this process.

No timed assertions: a stage that sleeps must come out on top, stages compare with each other, totals only grow.
"""

from __future__ import annotations

import time

import pytest
import torch

from stoker.synthetic import keys_of, make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.clock import STAGES, StageClock

SLEEP = 0.02


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("img"), rows=(40, 30, 50, 30))


def slow_collate(samples):
    time.sleep(SLEEP)
    return torch.utils.data.default_collate([{"label": s["label"]} for s in samples])


TRANSFORM_SLEEP = SLEEP / 2  # per sample: 1.5 s over the dataset, far above reading it even on a loaded machine


def slow_transform(sample):
    time.sleep(TRANSFORM_SLEEP)
    return sample


def test_clock_take_returns_what_was_added_since_the_last_take():
    clock = StageClock()
    clock.add("read", 1.0)
    clock.add("read", 0.5)
    assert clock.take() == {"read": 1.5}
    assert clock.take() == {}
    clock.merge({"read": 0.25, "handoff": 2.0})
    assert clock.take() == {"read": 0.25, "handoff": 2.0}
    assert clock.totals() == {"read": 1.75, "handoff": 2.0}
    with pytest.raises(ZeroDivisionError), clock.timing("collate"):
        1 / 0
    assert "collate" in clock.take()  # a failing block still counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_slow_collate_fn_is_the_largest_stage(images, num_workers):
    loader = DataLoader(StreamingDataset(images), batch_size=10, num_workers=num_workers, collate_fn=slow_collate)
    assert loader.stage_times() == {}  # nothing ran yet
    batches = list(loader)
    assert len(batches) == 15
    times = loader.stage_times()
    assert set(times) <= set(STAGES) and all(v >= 0 for v in times.values())
    # Every batch slept in the user's collate_fn, in whichever process made it: all of it is counted.
    assert times["transform"] >= 15 * SLEEP
    assert max(times, key=times.get) == "transform"
    assert "read" in times
    assert ("handoff" in times) == ("receive" in times) == (num_workers > 0)  # crossed processes only with workers


def test_per_sample_transform_is_counted_apart_from_reading(images):
    ds = StreamingDataset(images, transform=slow_transform)
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    assert len(keys_of(list(loader))) == 150
    times = loader.stage_times()
    assert times["transform"] >= 150 * TRANSFORM_SLEEP and times["transform"] > 2 * times["read"]
    assert times["collate"] > 0  # default_collate of the transformed samples: stoker's batching, not the user's


def test_default_columnar_batches_time_reading_collating_and_handoff_and_only_grow(images):
    loader = DataLoader(StreamingDataset(images), batch_size=8, num_workers=2, persistent_workers=True)
    list(loader)
    first = loader.stage_times()
    assert {"read", "collate", "handoff"} <= set(first) and "transform" not in first
    assert all(v > 0 for v in first.values())
    list(loader)
    second = loader.stage_times()
    assert all(second[k] > first[k] for k in ("read", "collate", "handoff"))  # a second epoch adds to each


def test_dataset_iterated_in_this_process_has_its_own_clock(images):
    ds = StreamingDataset(images, transform=slow_transform)
    samples = list(ds)
    assert len(samples) == 150
    times = ds.stage_times()
    assert set(times) == {"read", "transform"} and times["transform"] > times["read"]
    # A loader's batches count on the loader's clock, not on the dataset's.
    loader = DataLoader(ds, batch_size=50, num_workers=0)
    list(loader)
    assert ds.stage_times() == times and loader.stage_times()["transform"] >= 150 * TRANSFORM_SLEEP


def test_bucketed_stream_adds_its_bucketing_to_the_wrapped_datasets_stages(tmp_path):
    from stoker.bucketing.bucketed import BucketedStream

    text = make_dataset(tmp_path, rows=(60, 60), kind="text")
    stream = BucketedStream(StreamingDataset(text, transform=slow_transform), max_tokens=256, buffer_size=32)
    assert stream.stage_times() == {}
    batches = list(stream)
    assert sum(len(b) for b in batches) == 120
    times = stream.stage_times()
    assert {"read", "transform", "collate"} <= set(times)
    assert times["transform"] >= 120 * TRANSFORM_SLEEP and max(times, key=times.get) == "transform"
    assert times["collate"] > 0 and times["read"] == stream.dataset.stage_times()["read"]
