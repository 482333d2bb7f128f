"""One save/load contract for every stage and every composition of stages: stop after k items, checkpoint, build a
fresh one, load the checkpoint, and the rest it delivers is exactly what the uninterrupted run delivered after k."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from stoker.synthetic import make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.bucketing.bucketed import BucketedStream
from stoker.clock import StageClock
from stoker.dataloader.reader import decode_strings
from stoker.dataloader.stages import Batches, Bundler, RowReader, Samples
from stoker.dataloader.stream import BatchPlan
from stoker.errors import StateError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("img"), rows=(40, 30, 50, 30))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("txt"), rows=(60, 45, 45), kind="text", fmt="msgpack")


@dataclass
class Case:
    """`make()` builds a fresh stage (or dataset, or loader); `observe` turns one delivered item into plain data."""

    make: Callable[[], Any]
    observe: Callable[[Any], Any]


def reader(path: str, block: int = 1) -> RowReader:
    ds = StreamingDataset(path, seed=3, shuffle_buffer=40)
    return RowReader(ds, ds.epoch, 0, block, False, (0, 1), StageClock())


def keys(batch: Any) -> tuple[str, ...]:
    return tuple(batch["key"])


def bucket_keys(batch: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(str(s["key"]) for s in batch)


def plain_samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [{"key": str(i), "tokens": np.ones(int(n), np.uint16)} for i, n in enumerate(rng.integers(1, 60, 150))]


def cases(images: str, text: str) -> dict[str, Case]:
    plan = BatchPlan(batch_size=8)
    return {
        "RowReader": Case(lambda: reader(images), lambda got: tuple(decode_strings(got[0]["key"]))),
        "Samples": Case(lambda: Samples(reader(images), None, StageClock()), lambda s: s["key"]),
        "Batches": Case(lambda: Batches(reader(images, 8), plan, StageClock(), False), keys),
        "Bundler": Case(lambda: Bundler(Batches(reader(images, 8), plan, StageClock(), False), StageClock()),
                        lambda b: tuple(keys(item) for item in b.items)),
        "StreamingDataset": Case(lambda: StreamingDataset(images, seed=3, shuffle_buffer=40), lambda s: s["key"]),
        "BucketedStream(StreamingDataset)": Case(
            lambda: BucketedStream(StreamingDataset(text, seed=1, shuffle_buffer=50), max_tokens=300, buffer_size=32,
                                   seed=2), bucket_keys),
        "BucketedStream(list)": Case(lambda: BucketedStream(plain_samples(), batch_size=6, buffer_size=20, seed=5),
                                     bucket_keys),
        "DataLoader(workers=0)": Case(lambda: DataLoader(StreamingDataset(images, seed=3), batch_size=8), keys),
        "DataLoader(workers=2)": Case(lambda: DataLoader(StreamingDataset(images, seed=3), batch_size=8,
                                                         num_workers=2), keys),
        "DataLoader(BucketedStream, workers=0)": Case(lambda: bucketed_loader(text, 0), tuple),
        "DataLoader(BucketedStream, workers=2)": Case(lambda: bucketed_loader(text, 2), tuple),
    }


def bucketed_loader(text: str, workers: int) -> DataLoader:
    """A BucketedStream in stoker.DataLoader's workers: the loader collects each worker's state."""
    stream = BucketedStream(StreamingDataset(text, seed=1, shuffle_buffer=50), max_tokens=300, buffer_size=32, seed=2)
    return DataLoader(stream, batch_size=None, collate_fn=bucket_keys, num_workers=workers)


NAMES = list(cases("", ""))


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_resumes_exactly_after_a_checkpoint(images, text, name):
    case = cases(images, text)[name]
    full = [case.observe(item) for item in case.make()]
    assert len(full) > 4
    for k in (0, 1, len(full) // 2 + 1, len(full) - 1):
        stage = case.make()
        it = iter(stage)
        head = [case.observe(next(it)) for _ in range(k)]
        state = pickle.loads(pickle.dumps(stage.state_dict()))  # plain data: survives torch.save and pickling
        fresh = case.make()
        fresh.load_state_dict(state)
        rest = [case.observe(item) for item in fresh]
        assert head + rest == full, f"{name}: resuming after {k} of {len(full)} items"


@pytest.mark.parametrize("name", ["RowReader", "Samples", "Batches", "Bundler", "BucketedStream(list)"])
def test_a_state_that_does_not_fit_is_a_state_error(images, text, name):
    case = cases(images, text)[name]
    with pytest.raises(StateError):
        case.make().load_state_dict({"unrelated": 1})


def test_bucketed_stream_rejects_a_checkpoint_of_other_settings():
    stream = BucketedStream(plain_samples(), batch_size=6, buffer_size=20, seed=5)
    next(iter(stream))
    state = stream.state_dict()
    with pytest.raises(StateError, match="buffer_size .checkpoint 20, now 30"):
        BucketedStream(plain_samples(), batch_size=6, buffer_size=30, seed=5).load_state_dict(state)
