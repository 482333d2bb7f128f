"""The cache's byte limit holds when several processes fill it at the same time (real processes, real files)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from stoker import cache

pytestmark = pytest.mark.timeout(60)
SHARD = 100_000
LIMIT = 250_000  # two shards fit, three do not


def _files_total(directory: str) -> int:
    # Every file in the cache directory, finished or being written (not the lock and pin folders' contents).
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False))


def _fill_together(directory: str, key: str, barrier, out) -> None:
    store = cache.ShardCache(directory, LIMIT)

    def fill(tmp: str) -> None:
        with open(tmp, "r+b" if os.path.exists(tmp) else "wb") as f:
            f.write(key.encode()[:1] * SHARD)
        # Every process is now past its eviction and has written its whole shard, not yet renamed: the moment at
        # which fills that each made room only for themselves would have passed the limit together.
        barrier.wait(timeout=30)
        out.put(_files_total(directory))
        barrier.wait(timeout=30)

    path = store.get(key, SHARD, fill, timeout=30)
    out.put(Path(path).read_bytes() == key.encode()[:1] * SHARD)


def test_fills_in_several_processes_at_once_stay_within_the_limit(tmp_path):
    directory = str(tmp_path / "cache")
    store = cache.ShardCache(directory, LIMIT)
    for key in ("old-a", "old-b"):  # a full cache: two entries of the last epoch, 200 KB of 250 KB
        store.get(key, SHARD, lambda tmp: Path(tmp).write_bytes(b"o" * SHARD), timeout=5)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill_together, args=(directory, key, barrier, out)) for key in ("new-x", "new-y")]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(4)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    totals = [r for r in results if not isinstance(r, bool)]
    assert [r for r in results if isinstance(r, bool)] == [True, True]
    assert len(totals) == 2 and max(totals) <= LIMIT, totals
    # Both old entries had to go for the two new ones (one each would have left 300 KB on disk mid-fill).
    assert sorted(n for n in os.listdir(directory) if not n.startswith(".")) == ["new-x", "new-y"]
    assert _files_total(directory) <= LIMIT


def test_a_fill_is_counted_at_its_final_size_from_its_start(tmp_path):
    # One process's fill in progress (its lock held, its temporary file reserved) and another process making room:
    # the second sees the first's whole shard, not the bytes it has written so far.
    directory = str(tmp_path / "cache")
    store = cache.ShardCache(directory, LIMIT)
    store.get("old-a", SHARD, lambda tmp: Path(tmp).write_bytes(b"o" * SHARD), timeout=5)
    ctx = mp.get_context("fork")
    started, release, out = ctx.Event(), ctx.Event(), ctx.Queue()

    def slow(directory: str) -> None:
        def fill(tmp: str) -> None:
            out.put(os.path.getsize(tmp) if os.path.exists(tmp) else 0)  # reserved before a byte arrived
            started.set()
            release.wait(30)
            Path(tmp).write_bytes(b"s" * SHARD)

        cache.ShardCache(directory, LIMIT).get("slow", SHARD, fill, timeout=30)

    p = ctx.Process(target=slow, args=(directory,), daemon=True)
    p.start()
    assert started.wait(30)
    assert out.get(timeout=5) == SHARD
    store.get("next", SHARD, lambda tmp: Path(tmp).write_bytes(b"n" * SHARD), timeout=5)
    release.set()
    p.join(30)
    assert p.exitcode == 0
    # old-a (the least recently used) made way: old-a + slow + next would be 300 KB.
    assert sorted(n for n in os.listdir(directory) if not n.startswith(".")) == ["next", "slow"]
