"""The fast paths of the streaming loader keep its guarantees: bundled batches, shards kept open, the catalog gather."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from stoker.synthetic import keys_of, make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.dataloader import workers
from stoker.dataloader.loader import bundle_size, inner_prefetch
from stoker.dataloader.reader import Catalog, OpenShard, ShardSource, gather
from stoker.formats.shard import open_shard

ALL = [f"{i:06d}" for i in range(150)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("img"), rows=(40, 30, 50, 30))


def test_bundled_workers_always_have_two_messages_in_flight():
    assert inner_prefetch(2, 8) == 2 and inner_prefetch(32, 8) == 4  # never one bundle per worker at a time
    assert inner_prefetch(1, 1) == 1 and inner_prefetch(3, 1) == 3  # unbundled: exactly what the user asked


def test_bundle_size_counts_samples_and_bytes():
    assert bundle_size(64, 2, 110_000) == 4  # 256 samples, ~28 MB per message
    assert bundle_size(4, 2, 200) == 8  # capped
    assert bundle_size(256, 2, 100) == 1 and bundle_size(64, 2, 1 << 20) == 1  # big batches travel alone
    assert bundle_size(4, 0, 200) == 1  # no workers, no messages


@pytest.mark.parametrize("batch_size", [3, 7, 16])
def test_bundled_batches_arrive_in_the_order_of_unbundled_ones(images, batch_size):
    # Small batches travel in bundles; the sequence must be exactly the one without workers (no bundles).
    sequences, sizes = [], []
    for num_workers in (0, 2, 3):
        ds = StreamingDataset(images, seed=5, shuffle_buffer=1000)
        batches = list(DataLoader(ds, batch_size=batch_size, num_workers=num_workers))
        sequences.append(keys_of(batches))
        sizes.append([len(b["key"]) for b in batches])
    assert sequences[0] == sequences[1] == sequences[2] and sorted(sequences[0]) == ALL
    assert sizes[0] == sizes[1] == sizes[2]


def test_each_epoch_starts_with_small_bundles(images, monkeypatch):
    # The first batch of an epoch costs one batch's work, not a whole bundle's; then bundles grow to full size.
    loader = DataLoader(StreamingDataset(images, shuffle_buffer=150), batch_size=4, num_workers=1,
                        persistent_workers=True)
    epochs = [iter(loader)]  # the worker forks now, before the patch: it pickles with the real functions
    sizes = []
    unpack_bundle = workers.unpack_bundle

    def recording(*args):  # what the main process runs per message
        bundle = unpack_bundle(*args)
        sizes.append(len(bundle.items))
        return bundle

    monkeypatch.setattr(workers, "unpack_bundle", recording)
    epochs.append(loader)
    for epoch in epochs:
        sizes.clear()
        assert sorted(keys_of(list(epoch))) == ALL
        assert sizes == [1, 2, 4, 8, 8, 8, 7]  # 38 batches of 4: full bundles are 8 batches (bundle_size)


def test_bundled_batches_share_a_slab_and_stay_valid_while_held(images):
    loader = DataLoader(StreamingDataset(images, shuffle_buffer=1000), batch_size=4, num_workers=2,
                        persistent_workers=True)
    for _ in range(2):
        kept = list(loader)  # every batch held at once: no slab may be reused under them
        assert sorted(keys_of(kept)) == ALL
        for batch in kept:
            for key, image in zip(batch["key"], batch["image"]):
                assert bytes(image[:6]).decode() == key
    del kept, batch, image
    workers.sweep()
    assert not workers._held


def test_checkpoint_mid_epoch_counts_bundled_batches_one_by_one(images):
    loader = DataLoader(StreamingDataset(images, seed=3, shuffle_buffer=1000), batch_size=5, num_workers=2)
    it = iter(loader)
    head = keys_of([next(it) for _ in range(7)])  # the workers have sent more than that already
    state = loader.state_dict()
    assert state["consumed"] == 35
    resumed = DataLoader(StreamingDataset(images, seed=3, shuffle_buffer=1000), batch_size=5, num_workers=2)
    resumed.load_state_dict(state)
    assert sorted(head + keys_of(list(resumed))) == ALL


def test_an_error_inside_a_bundle_comes_after_the_batches_before_it(images):
    def transform(sample):
        if sample["key"] == bad:
            raise ValueError("bad sample")
        return sample["key"]

    order = keys_of(list(DataLoader(StreamingDataset(images, seed=1, shuffle_buffer=1000), batch_size=4)))
    bad = order[41]  # in the 11th batch, the 3rd of a worker's bundle
    loader = DataLoader(StreamingDataset(images, seed=1, shuffle_buffer=1000, transform=transform), batch_size=4,
                        num_workers=2, collate_fn=list)
    delivered = []
    with pytest.raises(ValueError, match="bad sample"):
        for batch in loader:
            delivered += batch
    assert delivered == order[:40] and loader.state_dict()["consumed"] == 40


def test_a_kept_open_shard_is_reopened_when_its_file_changes(tmp_path):
    root = make_dataset(tmp_path / "a", rows=(20, 20))
    other = make_dataset(tmp_path / "b", rows=(20, 20), seed=9)
    ds = StreamingDataset(root, shuffle=False)
    source = ShardSource(ds.source, ds.manifest, None, None, 0, ds.read)
    first = source.open(0, ds.columns)
    source.release(0, first)
    assert source.open(0, ds.columns) is first  # unchanged: still mapped, tables kept
    source.release(0, first)
    name = ds.manifest.shards[0].name
    shutil.copy(os.path.join(other, name), os.path.join(root, name + ".new"))
    os.replace(os.path.join(root, name + ".new"), os.path.join(root, name))  # replaced under the same name
    again = source.open(0, ds.columns)
    assert again is not first and again.identity != first.identity
    source.close()


def test_catalog_gathers_what_gather_does(images):
    ds = StreamingDataset(images)
    shards = {s: OpenShard(open_shard(os.path.join(images, info.name), name=info.name), ds.columns)
              for s, info in enumerate(ds.manifest.shards)}
    catalog = Catalog(len(shards), ds.columns)
    catalog.update(shards)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(shards), 50)
    rows = np.array([rng.integers(0, ds.manifest.shards[s].rows) for s in ids])
    fast, slow = catalog.gather(ids, rows), gather(shards, ids, rows, ds.columns)
    for name in ds.columns:
        if ds.kinds[name] == "fixed":
            assert np.array_equal(fast[name], slow[name])
        else:
            assert [bytes(v) for v in fast[name].views()] == [bytes(v) for v in slow[name].views()]
    del shards[1]
    catalog.update(shards)
    with pytest.raises(KeyError, match=r"\[1\]"):
        catalog.gather(np.array([0, 1]), np.array([0, 0]))


def test_bundles_are_pinned_like_single_batches(images):
    bundle = workers.Bundle(0, 0, [{"label": torch.arange(3)}])
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA for pinned memory")
    assert bundle.pin_memory().items[0]["label"].is_pinned()
