"""Chaos on the local shard cache: the disk fills up, the directory is deleted mid-epoch, an entry is damaged.

Remote data lives in fsspec's in-process memory filesystem (real fsspec reads, no network), so these run fast.
After each: every sample of the epoch delivered exactly once, or a clear StorageError.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from stoker.synthetic import keys_of, make_dataset, to_memory

from stoker import DataLoader, StreamingDataset, cache
from stoker.dataloader import ReadOptions
from stoker.errors import StorageError
from stoker.formats.manifest import Manifest

pytestmark = pytest.mark.timeout(60)
READ = ReadOptions(prefetch_shards=1, part_size=8192, parallel_reads=2, attempts=2, backoff=0.01, shard_timeout=20)


@pytest.fixture
def remote(tmp_path):
    local = make_dataset(tmp_path / "src", rows=(20,) * 8, payload=(4000, 8000), seed=3)
    return to_memory(local), max(s.bytes for s in Manifest.load(local).shards)


ALL = [f"{i:06d}" for i in range(160)]


def epoch(ds: StreamingDataset, number: int) -> list[str]:
    # Batches of 10 (in this process): only one shuffle window of shards is open at a time.
    ds.set_epoch(number)
    return keys_of(list(DataLoader(ds, batch_size=10, num_workers=0)))


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (root only); None where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _simulate_enospc(monkeypatch, root: Path, quota: int) -> None:
    # Fallback without root: reserving or writing cache files fails with ENOSPC once the files under `root` would
    # pass `quota` bytes (only growth beyond a file's size takes space, as on a disk).
    real_pwrite, real_fallocate = os.pwrite, os.posix_fallocate

    def check(fd, end):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(root)):
            used = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
            if used + max(0, end - os.fstat(fd).st_size) > quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def pwrite(fd, data, offset):
        check(fd, offset + len(data))
        return real_pwrite(fd, data, offset)

    def posix_fallocate(fd, offset, length):
        check(fd, offset + length)
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(cache.os, "pwrite", pwrite)
    monkeypatch.setattr(cache.os, "posix_fallocate", posix_fallocate)


def _disk(small_disk, tmp_path, monkeypatch) -> Path:
    root = small_disk or tmp_path / "quota"
    if small_disk is None:
        root.mkdir()
        _simulate_enospc(monkeypatch, root, 1 << 20)
    return root


def test_disk_full_evicts_unused_entries_and_the_epoch_completes(remote, small_disk, tmp_path, monkeypatch):
    url, shard = remote
    directory = _disk(small_disk, tmp_path, monkeypatch) / "cache"
    assert 8 * shard > 1 << 20 > 4 * shard  # the dataset does not fit on the disk; one window does
    # The byte limit says 16 GiB: only the real disk (1 MiB) stops the cache from growing.
    ds = StreamingDataset(url, cache_dir=str(directory), shuffle_buffer=20, read=READ)
    for number in range(2):
        assert sorted(epoch(ds, number)) == ALL
    assert not [n for n in os.listdir(directory) if ".tmp-" in n]


def test_disk_too_small_for_one_shard_is_a_clear_storage_error(remote, small_disk, tmp_path, monkeypatch):
    url, shard = remote
    root = _disk(small_disk, tmp_path, monkeypatch)
    directory = root / "cache"
    blocker = root / "someone-elses-file"  # another program filled the disk: not ours to evict
    with open(blocker, "wb") as f:
        try:
            f.write(b"\0" * ((1 << 20) - shard // 2))
        except OSError:
            pass
    ds = StreamingDataset(url, cache_dir=str(directory), shuffle_buffer=20, read=READ)
    with pytest.raises(StorageError, match=r"no space left for .*shard-\d+\.arrow.*in the cache"):
        epoch(ds, 0)
    assert not [n for n in os.listdir(directory) if ".tmp-" in n]


def test_cache_directory_deleted_mid_epoch(remote, tmp_path):
    url, _ = remote
    directory = tmp_path / "cache"
    ds = StreamingDataset(url, cache_dir=str(directory), shuffle_buffer=20, read=READ, seed=5)
    keys = []
    for i, batch in enumerate(DataLoader(ds, batch_size=10, num_workers=0)):
        keys += batch["key"]
        if i in (3, 9):
            # A cleanup script, twice; like `rm -rf`, it ignores files that a prefetch renames away under it.
            shutil.rmtree(directory, ignore_errors=True)
    assert sorted(keys) == ALL
    assert sorted(epoch(ds, 1)) == ALL


def test_damaged_cache_entries_are_detected_evicted_and_refetched(remote, tmp_path):
    url, _ = remote
    directory = tmp_path / "cache"
    ds = StreamingDataset(url, cache_dir=str(directory), shuffle=False, read=READ, cache_limit=1 << 30)
    assert [s["key"] for s in ds] == ALL
    entries = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    assert len(entries) == 8
    good = {n: (directory / n).read_bytes() for n in entries}
    (directory / entries[0]).write_bytes(good[entries[0]][:-100])  # truncated: wrong size
    damaged = bytearray(good[entries[1]])
    damaged[-64:] = b"\0" * 64  # same size, Arrow footer destroyed: unreadable
    (directory / entries[1]).write_bytes(bytes(damaged))
    assert [s["key"] for s in ds] == ALL
    assert {n: (directory / n).read_bytes() for n in entries} == good  # both refetched from storage


def test_cache_keys_never_leave_the_cache_directory(tmp_path):
    store = cache.ShardCache(str(tmp_path / "c"), 1 << 20)
    for key in ("../escape", "/etc/passwd", ".locks", "a\0b", "", "x/../../y"):
        with pytest.raises(StorageError, match="not a plain file name"):
            store.get(key, 1, lambda tmp: Path(tmp).write_bytes(b"x"), timeout=5)
    assert not (tmp_path / "escape").exists()
