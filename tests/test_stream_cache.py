"""The local shard cache and remote reads through fsspec's memory filesystem (real fsspec, in process)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import fsspec
import pytest

from stoker.synthetic import make_dataset, to_memory
from stoker import StreamingDataset, cache
from stoker.dataloader import ReadOptions
from stoker.errors import ChecksumError, ConfigError, ShardError, ShardNotFoundError, StorageError


def _fill_from(path: str, log: str, body: bytes):
    def fill(tmp: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for every other process to be waiting on the lock
        Path(tmp).write_bytes(body)

    return fill


def _get_in_process(directory: str, log: str, out: mp.Queue) -> None:
    store = cache.ShardCache(directory, 1 << 20)
    path = store.get("abc-shard.arrow", 5, _fill_from(directory, log, b"hello"), timeout=30)
    out.put(Path(path).read_bytes())


def test_one_process_fills_while_the_others_wait(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    log = str(tmp_path / "fills.log")
    procs = [ctx.Process(target=_get_in_process, args=(str(tmp_path / "cache"), log, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [b"hello"] * 4
    assert len(Path(log).read_text().splitlines()) == 1
    assert [n for n in os.listdir(tmp_path / "cache") if ".tmp-" in n] == []


def test_lru_eviction_keeps_recent_files_under_the_limit(tmp_path):
    store = cache.ShardCache(str(tmp_path), 250)

    def fill(tmp):
        Path(tmp).write_bytes(b"x" * 100)

    for key in ("a", "b"):
        store.get(key, 100, fill, timeout=5)
        time.sleep(0.02)
    os.utime(store.path("a"))  # "a" used again: "b" is now the oldest
    store.get("c", 100, fill, timeout=5)
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["a", "c"]
    orphan = tmp_path / ".a.tmp-deadbeef0000"  # left by a writer that died
    orphan.write_bytes(b"partial")
    store.get("d", 100, fill, timeout=5)
    assert not orphan.exists()
    assert sum(os.path.getsize(store.path(k)) for k in ("a", "c", "d") if os.path.exists(store.path(k))) <= 250


def test_checksum_mismatch_is_refetched_once_then_an_error(tmp_path):
    digests = iter(["bad", "good"])
    cache.fill_verified(str(tmp_path / "x"), lambda dst: next(digests), "good", "s.arrow", "memory://x")
    calls = []

    def always_bad(dst):
        calls.append(dst)
        return "0" * 64

    with pytest.raises(ShardError, match="s.arrow.*also after a refetch"):
        cache.fill_verified(str(tmp_path / "y"), always_bad, "f" * 64, "s.arrow", "memory://y")
    assert len(calls) == 2


def test_retry_backs_off_then_names_what_failed():
    attempts = []

    def flaky():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("reset by peer")
        return b"ok"

    assert cache.retry(flaky, attempts=3, backoff=0.01, deadline=time.monotonic() + 10, what="x") == b"ok"
    assert attempts[2] - attempts[1] >= attempts[1] - attempts[0] > 0
    with pytest.raises(StorageError, match="shard s7.*2 attempt.*reset by peer"):
        cache.retry(lambda: (_ for _ in ()).throw(ConnectionError("reset by peer")), attempts=2, backoff=0,
                    deadline=time.monotonic() + 10, what="shard s7")
    with pytest.raises(StorageError, match="access denied"):
        cache.retry(lambda: (_ for _ in ()).throw(PermissionError("403")), attempts=3, backoff=0,
                    deadline=time.monotonic() + 10, what="x")


def test_remote_stream_fills_the_cache_with_parallel_ranged_reads(tmp_path):
    url = to_memory(make_dataset(tmp_path / "src", rows=(30, 30, 30), batch_bytes=2048))
    ds = StreamingDataset(url, cache_dir=str(tmp_path / "cache"), shuffle_buffer=16,
                          read=ReadOptions(part_size=1000, parallel_reads=3))
    assert sorted(s["key"] for s in ds) == [f"{i:06d}" for i in range(90)]
    cached = sorted(n for n in os.listdir(tmp_path / "cache") if not n.startswith("."))
    assert len(cached) == 3 and all(n.split("-", 1)[1].startswith("shard-") for n in cached)
    for name in cached:  # byte-identical to the source shards
        assert (tmp_path / "cache" / name).read_bytes() == (tmp_path / "src" / name.split("-", 1)[1]).read_bytes()


def test_remote_corruption_and_missing_shards_name_the_shard(tmp_path):
    url = to_memory(make_dataset(tmp_path / "src", rows=(10, 10)))
    fs = fsspec.filesystem("memory")
    body = bytearray(fs.cat(url + "/shard-00001.arrow"))
    body[100] ^= 0xFF
    fs.pipe(url + "/shard-00001.arrow", bytes(body))
    # Without per-sample checks the whole shard's sha256 is checked as it is downloaded.
    ds = StreamingDataset(url, cache_dir=str(tmp_path / "c1"), shuffle=False, read=ReadOptions(checksums=False))
    with pytest.raises(ShardError, match="shard-00001.arrow.*sha256"):
        list(ds)
    assert not [n for n in os.listdir(tmp_path / "c1") if "shard-00001" in n]  # nothing corrupt was published
    fs.rm(url + "/shard-00000.arrow")
    with pytest.raises(ShardNotFoundError, match="shard-00000.arrow"):
        list(StreamingDataset(url, cache_dir=str(tmp_path / "c2"), shuffle=False))


def test_a_sample_damaged_in_the_store_is_named_by_its_checksum_without_a_whole_shard_hash(tmp_path):
    url = to_memory(make_dataset(tmp_path / "src", rows=(10, 10)))
    fs = fsspec.filesystem("memory")
    body = bytearray(fs.cat(url + "/shard-00001.arrow"))
    at = body.index(b"000013")  # the key of the shard's fourth sample
    body[at + 5] ^= 0x01
    fs.pipe(url + "/shard-00001.arrow", bytes(body))
    ds = StreamingDataset(url, cache_dir=str(tmp_path / "c"), shuffle=False)
    with pytest.raises(ChecksumError, match="shard-00001.arrow.*row 3"):
        list(ds)
    # The damaged entry is not kept: once the store holds the shard as packed again, it is fetched again.
    assert [n for n in os.listdir(tmp_path / "c") if not n.startswith(".")] == [
        n for n in os.listdir(tmp_path / "c") if "shard-00000" in n]
    fs.pipe(url + "/shard-00001.arrow", (tmp_path / "src" / "shard-00001.arrow").read_bytes())
    assert [s["key"] for s in ds] == [f"{i:06d}" for i in range(20)]


def test_cache_limit_below_one_window_is_a_config_error(tmp_path):
    url = to_memory(make_dataset(tmp_path / "src", rows=(10, 10, 10, 10)))
    with pytest.raises(ConfigError, match="cache_limit"):
        StreamingDataset(url, cache_dir=str(tmp_path / "c"), cache_limit=1000, shuffle_buffer=30)


def test_a_cache_directory_deleted_during_every_fill_is_a_clear_error(tmp_path):
    import shutil

    from stoker.errors import StorageError

    store = cache.ShardCache(str(tmp_path / "cache"), 1 << 20)
    fills = []

    def fill(tmp: str) -> None:  # a cleanup script that deletes the cache under every fill
        fills.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"x" * 10)
        shutil.rmtree(tmp_path / "cache")

    with pytest.raises(StorageError, match=rf"cache directory .* was deleted {cache.VANISH_RETRIES + 1} times while k was "
                       "being filled"):
        store.get("k", 10, fill, timeout=5)
    assert len(fills) == 1 + cache.VANISH_RETRIES

    calls = []

    def fill_after_one_deletion(tmp: str) -> None:  # deleted once: filled again, and the entry is there
        calls.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"y" * 10)
        if len(calls) == 1:
            shutil.rmtree(tmp_path / "cache")

    path = store.get("k", 10, fill_after_one_deletion, timeout=5)
    assert len(calls) == 2 and Path(path).read_bytes() == b"y" * 10
