"""Streaming from a real S3 endpoint (moto_server on loopback) through s3fs: delivery, cache, corruption, outages."""

from __future__ import annotations

import os

import pytest

from stoker.synthetic import keys_of, make_dataset
from stoker.testing import S3Server, serving
from stoker import DataLoader, StreamingDataset
from stoker.dataloader import ReadOptions
from stoker.errors import ShardError, StorageError

pytestmark = pytest.mark.remote

FAST_FAIL = ReadOptions(prefetch_shards=1, attempts=2, backoff=0.05, connect_timeout=2, read_timeout=5,
                        shard_timeout=30)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("s3src"), rows=(20,) * 8, payload=(200, 2000))


@pytest.fixture(scope="module")
def s3(local):
    with serving(local) as server:
        yield server


def cached_shards(directory):
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


def test_stream_from_s3_with_workers_fills_the_cache_once(s3, tmp_path):
    ds = StreamingDataset("s3://data/ds", storage_options=s3.storage_options(), cache_dir=str(tmp_path),
                          shuffle_buffer=30, read=ReadOptions(part_size=4096, parallel_reads=4))
    loader = DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=True)
    first = keys_of(list(loader))
    assert sorted(first) == [f"{i:06d}" for i in range(160)]
    assert {"fetch", "read", "collate", "handoff"} <= set(loader.stage_times())  # waits on downloads counted apart
    files = cached_shards(tmp_path)
    assert len(files) == 8
    stamps = {f: os.stat(tmp_path / f).st_ino for f in files}
    second = keys_of(list(loader))
    assert sorted(second) == sorted(first) and second != first
    assert {f: os.stat(tmp_path / f).st_ino for f in cached_shards(tmp_path)} == stamps  # served from the cache


@pytest.mark.parametrize("checksums", [True, False])
def test_corrupt_object_is_refetched_then_reported_with_its_shard(s3, local, tmp_path, checksums):
    client = s3.client()
    body = bytearray((open(os.path.join(local, "shard-00003.arrow"), "rb").read()))
    body[500] ^= 0x55
    client.put_object(Bucket="data", Key="bad/shard-00003.arrow", Body=bytes(body))
    for name in os.listdir(local):
        if name != "shard-00003.arrow":
            client.upload_file(os.path.join(local, name), "data", f"bad/{name}")
    ds = StreamingDataset("s3://data/bad", storage_options=s3.storage_options(), cache_dir=str(tmp_path), shuffle=False,
                          read=ReadOptions(checksums=checksums))
    # Without per-sample checks the download's sha256 finds it; with them (no whole-shard hash), opening the shard.
    match = "also after a refetch" if not checksums else "not a readable Arrow IPC file"
    # One worker: with two, the other may be stopped mid-fill by the first one's error and leave a published copy,
    # which its next open finds damaged and evicts (test_chaos_cache.py covers that path).
    with pytest.raises(ShardError, match=f"shard-00003.arrow.*{match}") as info:
        list(DataLoader(ds, batch_size=10, num_workers=1))
    assert info.value.shard == "shard-00003.arrow"
    assert not [f for f in cached_shards(tmp_path) if f.endswith("shard-00003.arrow")]


@pytest.mark.slow
def test_server_killed_mid_epoch_is_a_clear_error_and_the_run_resumes_after_restart(local, tmp_path):
    with S3Server() as server:
        server.create_bucket("data")
        server.upload_dir(local, "s3://data/ds")
        options = server.storage_options()
        ds = StreamingDataset("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "cache"),
                              shuffle_buffer=20, read=FAST_FAIL)
        loader = DataLoader(ds, batch_size=10, num_workers=2)
        delivered = []
        with pytest.raises(StorageError, match=r"shard shard-\d+\.arrow \(s3://data/ds/shard-\d+\.arrow\)"):
            for batch in loader:
                delivered += batch["key"]
                if len(delivered) == 20:
                    server.kill()  # most shards are not fetched yet: prefetching runs one shard ahead
        state = loader.state_dict()
        assert state["consumed"] == len(delivered) < 160

        server.restart()
        server.create_bucket("data")
        server.upload_dir(local, "s3://data/ds")
        resumed = DataLoader(StreamingDataset("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "cache"),
                                              shuffle_buffer=20, read=FAST_FAIL), batch_size=10, num_workers=2)
        resumed.load_state_dict(state)
        rest = keys_of(list(resumed))
    assert sorted(delivered + rest) == [f"{i:06d}" for i in range(160)]


def _child_reads_again(loop, url, options, queue):
    from stoker import storage

    inherited_loop_runs = loop.is_running()
    # fsspec drops the parent's s3fs instance on this first use, which runs its finalizer here.
    queue.put((inherited_loop_runs, len(storage.read_bytes(url, options))))


def test_forked_worker_drops_the_parents_s3_session_without_waiting_on_its_loop(s3, capfd):
    import multiprocessing as mp

    from stoker import storage

    url, options = "s3://data/ds/manifest.json", s3.storage_options()
    size = len(storage.read_bytes(url, options))  # a live s3fs instance and event loop in this process
    fs, _ = storage.filesystem(url, options)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads_again, args=(fs.loop, url, options, queue))
    child.start()
    inherited_loop_runs, child_size = queue.get(timeout=60)
    child.join(30)
    # A loop that still "runs" in the child made s3fs's finalizer wait 1 s on a thread that is not there.
    assert (inherited_loop_runs, child_size, child.exitcode) == (False, size, 0)
    assert "Unclosed client session" not in capfd.readouterr().err
