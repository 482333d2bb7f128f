"""Shared-memory slabs (stoker.shm): the pool's reuse rules, and stoker's own transforms building their batches in
reusable slabs inside stoker.DataLoader's workers while the batches the user holds stay intact."""

from __future__ import annotations

import pytest
import torch

from stoker import DataLoader, StreamingDataset, TransformSpec, build_transform, pack_dataset, shm
from stoker.dataloader import workers


def test_slab_pool_reuses_a_slab_once_the_main_process_frees_it():
    pool = shm.SlabPool(max_slabs=2)
    key_a, a, first_a, _ = pool.take(1000)
    key_b, b, _, _ = pool.take(1000)
    assert first_a and key_a != key_b and shm.slab_state(a)[0] == shm.IN_USE
    key_c, c, _, _ = pool.take(10)
    assert key_c is None and shm.slab_state(c)[0] == shm.ONE_OFF  # both pooled slabs are still out
    shm.slab_state(a)[0] = shm.FREE
    assert pool.take(500)[:3] == (key_a, a, False)  # reused, and the main process already maps it
    shm.slab_state(b)[0] = shm.FREE
    key_d, d, first_d, replaced = pool.take(10 << 20)  # too big for b: b is replaced by a bigger slab
    assert first_d and replaced == key_b and key_d not in (key_a, key_b) and d.numel() > 10 << 20


def test_batch_buffer_comes_from_the_lent_pool_only():
    assert shm.batch_buffer(100) is None  # nothing lent: the caller allocates as usual
    pool = shm.SlabPool(max_slabs=2)
    with shm.lending(pool) as lent:
        buffer = shm.batch_buffer(100)
    assert buffer is not None and buffer.numel() == 100 and len(lent) == 1
    assert buffer.untyped_storage().data_ptr() == lent[0].slab.untyped_storage().data_ptr()
    assert shm.slab_state(lent[0].slab)[0] == shm.IN_USE
    assert shm.batch_buffer(100) is None  # only while lent


@pytest.fixture(scope="module")
def packed(image_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("pil-shards")
    pack_dataset(str(image_tree), str(dst), shard_size=64 << 10, workers=1, progress=False)
    return str(dst)


def loader_processes():
    import psutil

    return psutil.Process().children()


def test_pil_batches_from_workers_reuse_slabs_and_held_batches_stay_intact(packed):
    spec = TransformSpec(size=32, mode="eval", dtype="uint8")
    transform = build_transform(spec, backend="pil", seed=0)
    expected = {}
    for batch in DataLoader(StreamingDataset(packed, shuffle=False), batch_size=4, collate_fn=transform):
        expected.update({k: img.clone() for k, img in zip(batch["key"], batch["image"])})
    loader = DataLoader(StreamingDataset(packed, shuffle=False), batch_size=4, collate_fn=transform, num_workers=2,
                        persistent_workers=True)
    workers.sweep()
    held = []
    worker_pids: set[int] = set()
    for epoch in range(3):
        batches = list(loader)
        worker_pids |= {p.pid for p in loader_processes()}
        if epoch == 0:
            held = batches  # kept through the next epochs: their slabs must not be reused under them
        for batch in batches + held:
            for key, image in zip(batch["key"], batch["image"]):
                assert torch.equal(image, expected[key]), key
    assert len(expected) == sum(len(b["key"]) for b in held) == 24
    # Pooled slabs travelled (and were mapped once each) instead of a fresh shared buffer per batch: 18 batches,
    # of which 6 are still held, came in at most one slab per batch in flight.
    pooled = [k for k in workers._slabs if k[0] in worker_pids]
    assert 0 < len(pooled) < 18
    del batches, held, batch, image
    workers.sweep()
