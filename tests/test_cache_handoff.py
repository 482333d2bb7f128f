"""Cache entries read by workers reach the training process as views of the same file: held while read, pinned in
transit, so eviction and refills never change what a batch holds."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import pytest

from stoker.synthetic import make_dataset, to_memory
from stoker import DataLoader, StreamingDataset, cache
from stoker.dataloader import ReadOptions


def _filler(body: bytes):
    def fill(tmp: str) -> None:
        Path(tmp).write_bytes(body)

    return fill


def _age(path: str, seconds: float) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns - int(seconds * 1e9), st.st_mtime_ns))  # least recently used first


def test_eviction_leaves_an_entry_a_reader_holds(tmp_path):
    store = cache.ShardCache(str(tmp_path), 250)
    for key in ("a", "b"):
        store.get(key, 100, _filler(b"x" * 100), timeout=5)
    _age(store.path("a"), 20)
    _age(store.path("b"), 10)
    held = cache.hold(store.path("a"), "shard a")
    store.get("c", 100, _filler(b"x" * 100), timeout=5)  # "a" is the oldest, but held: "b" goes
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["a", "c"]
    held.close()
    store.get("d", 100, _filler(b"x" * 100), timeout=5)  # no longer held: the oldest goes
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["c", "d"]


def test_a_handed_off_entry_is_the_file_the_reader_read_whatever_the_cache_does_meanwhile(tmp_path):
    store = cache.ShardCache(str(tmp_path), 1 << 20)
    path = store.get("a", 100, _filler(b"A" * 100), timeout=5)
    held = cache.hold(path, "shard a")
    wire = pickle.dumps(held.handoff())  # what a worker sends; the batch is now in transit
    held.close()
    store.evict("a", timeout=5)  # found damaged elsewhere, then filled again with other bytes
    store.get("a", 100, _filler(b"B" * 100), timeout=5)
    received = pickle.loads(wire)
    assert received == tuple(held) and received.fd is not None
    assert os.pread(received.fd, 100, 0) == b"A" * 100  # the file the worker read, not the refill
    assert os.listdir(tmp_path / ".pins") == []  # the pin is gone once received
    del received


# A batch never received: its training process is gone, or it is alive but that worker was shut down with its
# iterator (the batch was dropped with it).
@pytest.mark.parametrize("stale", ["{gone}-1-0-a", "{me}-{gone}-0-a"], ids=["training-process-gone", "worker-gone"])
def test_pins_of_batches_that_will_never_be_received_are_removed_by_eviction(tmp_path, stale):
    store = cache.ShardCache(str(tmp_path), 150)
    path = store.get("a", 100, _filler(b"A" * 100), timeout=5)
    gone = mp.get_context("fork").Process(target=os.getpid)
    gone.start()
    gone.join()
    pins = tmp_path / ".pins"
    pins.mkdir()
    os.link(path, pins / stale.format(gone=gone.pid, me=os.getpid()))
    os.link(path, pins / f"{os.getpid()}-1-0-a")  # both processes alive: this batch may still arrive
    store.get("b", 100, _filler(b"B" * 100), timeout=5)
    assert os.listdir(pins) == [f"{os.getpid()}-1-0-a"]


def test_batches_left_in_transit_by_an_epoch_left_early_do_not_pin_the_cache(tmp_path):
    local = make_dataset(tmp_path / "src", rows=(30,) * 8, payload=(2000, 6000), seed=5)
    url = to_memory(local)
    shard = max(os.path.getsize(os.path.join(local, n)) for n in os.listdir(local) if n.endswith(".arrow"))
    directory = tmp_path / "cache"
    ds = StreamingDataset(url, cache_dir=str(directory), cache_limit=4 * shard, shuffle_buffer=20, seed=1,
                          read=ReadOptions(prefetch_shards=1, part_size=4096))
    it = iter(DataLoader(ds, batch_size=8, num_workers=2, prefetch_factor=4))
    next(it)
    pins = directory / ".pins"
    deadline = time.monotonic() + 20
    while not (pins.is_dir() and os.listdir(pins)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the workers send their next batches ahead
    assert os.listdir(pins), "no batch was in transit when the epoch was left"
    del it  # left early: its workers stop, and what they sent is never received
    gc.collect()
    for _ in DataLoader(ds, batch_size=8, num_workers=2):
        pass
    assert os.listdir(pins) == []


def test_workers_hand_cached_rows_over_as_packed_with_evictions_under_way(tmp_path):
    local = make_dataset(tmp_path / "src", rows=(30,) * 8, payload=(2000, 6000), seed=4)
    url = to_memory(local)
    expected = {s["key"]: bytes(s["image"]) for s in StreamingDataset(local, shuffle=False)}
    # A cache for four shards of eight (the least it accepts here): entries are evicted while other workers' batches are in transit.
    shard = max(os.path.getsize(os.path.join(local, n)) for n in os.listdir(local) if n.endswith(".arrow"))
    directory = tmp_path / "cache"
    ds = StreamingDataset(url, cache_dir=str(directory), cache_limit=4 * shard, shuffle_buffer=20, seed=1,
                          read=ReadOptions(prefetch_shards=1, part_size=4096))
    got = {}
    for batch in DataLoader(ds, batch_size=8, num_workers=2):
        for key, image in zip(batch["key"], batch["image"]):
            got[key] = bytes(image)
    assert got == expected
    assert os.listdir(directory / ".pins") == []  # rows crossed as pinned views, every pin received
