"""stoker.DataLoader over a StreamingDataset, with real worker processes: delivery, order, resume, errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from stoker.synthetic import keys_of, make_dataset
from stoker import DataLoader, ShardDataset, StreamingDataset
from stoker.dataloader import reader, workers
from stoker.errors import ConfigError, ShardError

ALL = [f"{i:06d}" for i in range(150)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("img"), rows=(40, 30, 50, 30))


def run(loader):
    return [{k: v for k, v in b.items()} for b in loader]


def test_workers_deliver_every_sample_once_in_batches(images):
    ds = StreamingDataset(images, shuffle_buffer=40)
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    assert len(loader) == 10
    batches = run(loader)
    assert len(batches) == 10 and [len(b["key"]) for b in batches] == [16] * 9 + [6]
    assert sorted(keys_of(batches)) == ALL
    b = batches[0]
    assert b["label"].dtype == torch.int64 and b["label"].tolist() == [int(k) % 10 for k in b["key"]]
    assert all(bytes(img[:6]).decode() == key for img, key in zip(b["image"], b["key"]))
    assert isinstance(b["image"][0], memoryview) and b["height"].shape == (16,)


def test_order_does_not_depend_on_the_number_of_workers(images):
    sequences = []
    for num_workers in (0, 1, 2):
        ds = StreamingDataset(images, seed=11, shuffle_buffer=40)
        sequences.append(keys_of(run(DataLoader(ds, batch_size=8, num_workers=num_workers))))
    assert sequences[0] == sequences[1] == sequences[2] and sorted(sequences[0]) == ALL


def test_small_columns_only_and_unbatched_samples(images):
    batches = run(DataLoader(StreamingDataset(images, columns=["label", "key"]), batch_size=32, num_workers=2,
                             in_order=False))
    assert sorted(keys_of(batches)) == ALL and list(batches[0]) == ["key", "label"]
    assert batches[0]["label"].dtype == torch.int64
    samples = list(DataLoader(StreamingDataset(images), batch_size=None, num_workers=2))  # torch's own path
    assert sorted(s["key"] for s in samples) == ALL and isinstance(samples[0]["image"], bytes)


def test_drop_last_and_new_order_each_epoch(images):
    ds = StreamingDataset(images, shuffle_buffer=40)
    loader = DataLoader(ds, batch_size=16, num_workers=2, drop_last=True, persistent_workers=True)
    epochs = [keys_of(run(loader)) for _ in range(3)]
    assert [len(e) for e in epochs] == [144] * 3 and len(set(epochs[0])) == 144
    assert epochs[0] != epochs[1] != epochs[2] and ds.epoch == 3
    ds.set_epoch(1)  # an explicit epoch wins over the automatic one
    assert keys_of(run(loader)) == epochs[1]


@pytest.mark.parametrize("workers_before, workers_after, persistent", [(2, 2, False), (2, 1, True), (0, 2, False)])
def test_resume_mid_epoch_delivers_exactly_the_rest(images, workers_before, workers_after, persistent):
    full = keys_of(run(DataLoader(StreamingDataset(images, seed=2, shuffle_buffer=40), batch_size=8)))
    ds = StreamingDataset(images, seed=2, shuffle_buffer=40)
    loader = DataLoader(ds, batch_size=8, num_workers=workers_before, persistent_workers=persistent)
    it = iter(loader)
    head = keys_of([next(it) for _ in range(7)])
    state = loader.state_dict()
    assert state["consumed"] == 56 and state["epoch"] == 0
    del it
    fresh = StreamingDataset(images, seed=2, shuffle_buffer=40)
    resumed = DataLoader(fresh, batch_size=8, num_workers=workers_after, persistent_workers=persistent)
    resumed.load_state_dict(state)
    assert len(resumed) == 12
    tail = keys_of(run(resumed))
    assert head + tail == full
    assert resumed.state_dict()["epoch"] == 1 and len(keys_of(run(resumed))) == 150


def test_resume_with_another_batch_size_and_world_size(images, monkeypatch):
    """A checkpoint of rank 0 of 2 resumes as one rank: the two ranks' delivered samples plus the rest are everything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    heads = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        loader = DataLoader(StreamingDataset(images, shuffle_buffer=40), batch_size=10, num_workers=2)
        it = iter(loader)
        heads += keys_of([next(it) for _ in range(3)])
        state = loader.state_dict()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    resumed = DataLoader(StreamingDataset(images, shuffle_buffer=40), batch_size=7, num_workers=1)
    resumed.load_state_dict(state)
    assert state["consumed"] == 60
    assert sorted(heads + keys_of(run(resumed))) == ALL


def test_held_batches_are_never_overwritten(tmp_path, monkeypatch):
    # msgpack shards are parsed, not mapped: their bytes travel in slabs (local Arrow bytes are mapped, see below).
    ds = StreamingDataset(make_dataset(tmp_path, rows=(40, 30, 50, 30), fmt="msgpack"), shuffle_buffer=40)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=2)
    epochs = [iter(loader)]  # the workers fork now, before the patch below: they pickle with the real `unpack`
    keys = []
    unpack = workers.unpack

    def recording_unpack(key, *args):  # what the main process runs when it unpickles a batch
        keys.append(key)
        return unpack(key, *args)

    monkeypatch.setattr(workers, "unpack", recording_unpack)
    epochs.append(loader)
    for epoch in epochs:
        kept = []
        for i, batch in enumerate(epoch):
            if i % 3 == 0:
                kept.append(batch)  # the others are dropped at once, so their slabs get reused
        for batch in kept:
            for key, image in zip(batch["key"], batch["image"]):
                assert bytes(image[:6]).decode() == key
    del kept, batch, image  # the last memoryview checked still holds its slab
    workers.sweep()
    assert not workers._held  # once the user drops every batch, every slab is handed back to its worker
    pooled = [k for k in keys if k is not None]
    assert len(keys) == 76 and len(set(pooled)) <= 16 < len(pooled)  # 2 workers x 8 slabs, reused


def test_bytes_of_local_arrow_shards_are_mapped_not_copied(images):
    workers._mapped.clear()
    loader = DataLoader(StreamingDataset(images, shuffle_buffer=40), batch_size=16, num_workers=2)
    batches = run(loader)
    assert sorted(keys_of(batches)) == ALL and all(len(b["image"]) == len(b["key"]) for b in batches)
    for batch in batches:
        assert all(bytes(img[:6]).decode() == key for img, key in zip(batch["image"], batch["key"]))
    image = batches[0]["image"][0]
    assert image.readonly  # a view of the shard file's pages in this process
    mapped = {identity[0] for identity, _ in workers._mapped}
    assert mapped == {str(p) for p in Path(images).glob("*.arrow")} and not workers._held  # no slab was used
    workers._mapped.clear()  # what the LRU does with old shards: views the user holds stay valid
    assert bytes(image[:6]).decode() == batches[0]["key"][0]


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])  # mapped views, and views of a slab
def test_pinning_a_batch_leaves_its_bytes_as_memoryviews(tmp_path, fmt):
    from torch.utils.data._utils.pin_memory import pin_memory  # what torch's pin-memory thread calls

    ds = StreamingDataset(make_dataset(tmp_path, rows=(20,), fmt=fmt))
    for num_workers in (0, 1):
        batch = next(iter(DataLoader(ds, batch_size=4, num_workers=num_workers)))
        pinned = pin_memory({"image": batch["image"]})["image"]  # tensors need CUDA to pin; bytes never do
        assert [bytes(v) for v in pinned] == [bytes(v) for v in batch["image"]]
        assert all(isinstance(v, memoryview) for v in pinned)


def test_a_shard_changed_after_its_rows_were_planned_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path, rows=(20,))
    path = str(next(Path(root).glob("*.arrow")))
    identity = reader.file_identity(path)
    assert len(reader.mapped_values(identity, "image")) >= 1
    os.utime(path, ns=(0, 0))  # same bytes, but no longer the file the worker planned from
    with pytest.raises(ShardError, match=r"shard-00000\.arrow.*changed on disk"):
        reader.mapped_values(identity, "image")


def test_text_batches_and_custom_collate(tmp_path):
    root = make_dataset(tmp_path, rows=(25, 25), kind="text")
    batches = run(DataLoader(StreamingDataset(root), batch_size=6, num_workers=2))
    tokens = [t for b in batches for t in b["tokens"]]
    assert len(tokens) == 50 and tokens[0].dtype == torch.uint16
    for b in batches:
        assert [len(t) for t in b["tokens"]] == b["length"].tolist()
        assert all(int(t[0]) == int(k) for t, k in zip(b["tokens"], b["key"]))

    def collate(samples):
        return sorted(s["key"] for s in samples)

    got = list(DataLoader(StreamingDataset(root, transform=lambda s: {"key": s["key"] + "!"}), batch_size=5,
                          num_workers=2, collate_fn=collate))
    assert len(got) == 10 and all(k.endswith("!") for batch in got for k in batch)


def test_an_unpicklable_batch_is_an_error_not_a_hang(images):
    loader = DataLoader(StreamingDataset(images), batch_size=8, num_workers=2, collate_fn=lambda s: (x for x in s))
    with pytest.raises(TypeError, match="cannot be sent to the main process"):
        run(loader)


def _fail_on_key(sample):
    if sample["key"] == "000033":
        raise KeyError("no such label")
    return sample


def test_worker_exceptions_keep_their_type_traceback_and_sample(images):
    loader = DataLoader(StreamingDataset(images, transform=_fail_on_key), batch_size=8, num_workers=2)
    with pytest.raises(KeyError, match="no such label") as info:
        run(loader)
    notes = "\n".join(info.value.__notes__)
    assert "sample '000033' from shard shard-00000.arrow" in notes
    assert "DataLoader worker" in notes and "_fail_on_key" in notes


def test_corrupt_shard_in_a_worker_names_the_shard(tmp_path):
    root = make_dataset(tmp_path, rows=(20, 20))
    path = tmp_path / "shard-00001.arrow"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ShardError, match="shard-00001.arrow") as info:
        run(DataLoader(StreamingDataset(root, shuffle=False), batch_size=4, num_workers=2))
    assert info.value.shard == "shard-00001.arrow"


def _kill_self(sample):
    if sample["key"] == "000100":
        os.kill(os.getpid(), signal.SIGKILL)
    return sample


def test_a_killed_worker_is_an_error_not_a_hang(images):
    loader = DataLoader(StreamingDataset(images, shuffle=False, transform=_kill_self), batch_size=4, num_workers=2)
    with pytest.raises(RuntimeError, match="(?i)worker.*(killed|exited)"):
        run(loader)


def test_state_dict_needs_a_stream():
    loader = DataLoader(list(range(10)), batch_size=2)
    assert len(loader) == 5
    with pytest.raises(ConfigError, match="StreamingDataset"):
        loader.state_dict()


def test_shard_dataset_batches_through_getitems(images):
    ds = ShardDataset(images)
    calls = []
    original = ds.__getitems__

    def spy(indices):
        calls.append(len(indices))
        return original(indices)

    ds.__getitems__ = spy
    batches = list(DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert calls == [32, 32, 32, 32, 22] and sorted(keys_of(batches)) == ALL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pinned_batches(images):
    batch = next(iter(DataLoader(StreamingDataset(images), batch_size=8, num_workers=2, pin_memory=True)))
    assert batch["label"].is_pinned() and batch["label"].to("cuda").sum() == batch["label"].sum()
    assert bytes(batch["image"][0][:6]).decode() == batch["key"][0]


def _frozen_in_worker(samples):
    import gc

    return {"frozen": gc.get_freeze_count(), "n": len(samples)}


def test_workers_fork_with_the_parents_objects_frozen(images):
    import gc

    # Frozen objects are never walked by a worker's collector, so they stay shared instead of copied on write.
    streaming = DataLoader(StreamingDataset(images, seed=0), batch_size=16, num_workers=2, collate_fn=_frozen_in_worker)
    mapped = DataLoader(ShardDataset(images), batch_size=16, num_workers=2, collate_fn=_frozen_in_worker)
    for loader in (streaming, mapped):
        batches = list(loader)
        assert sum(b["n"] for b in batches) == 150
        assert min(b["frozen"] for b in batches) > 1000  # torch, numpy, stoker... all inherited frozen
    assert gc.get_freeze_count() == 0  # and this process collects them again


def test_a_callers_own_frozen_objects_stay_frozen(images):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert sum(len(b["label"]) for b in DataLoader(StreamingDataset(images, seed=0), batch_size=16, num_workers=1)) == 150
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen (refcounting may still free a few of them)
    finally:
        gc.unfreeze()
