"""Workers that read a remote dataset keep their C heap from creeping up epoch after epoch: two glibc arenas from
the start, trimmed at the end of every epoch (benchmarks/soak.py measures the memory itself)."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from stoker.synthetic import keys_of, make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.dataloader import workers

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim and mallopt are glibc's")


@glibc
def test_trim_heap_hands_freed_heap_pages_back():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(160)]  # 10 MB below the mmap threshold: heap pages
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)
    pin = libc.malloc(64)  # above them, so freeing them leaves a hole that free() itself does not give back
    for block in blocks:
        libc.free(block)
    try:
        assert workers.trim_heap() is True  # glibc: "some memory was released"
    finally:
        libc.free(pin)


@glibc
def test_limit_heap_arenas_makes_new_threads_share_two_arenas(tmp_path):
    # A fresh interpreter: arenas, once made, stay for the life of the process.
    script = textwrap.dedent("""
        import ctypes, sys, threading
        from stoker.dataloader import workers
        if sys.argv[1] == "limit":
            workers.limit_heap_arenas()
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.fopen.restype = ctypes.c_void_p
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        started = threading.Barrier(7)
        def allocate():
            libc.malloc(1000)  # a thread's first malloc picks its arena
            started.wait()
            started.wait()
        threads = [threading.Thread(target=allocate) for _ in range(6)]
        for t in threads:
            t.start()
        started.wait()
        out = libc.fopen(sys.argv[2].encode(), b"w")
        libc.malloc_info(0, out)
        libc.fclose(out)
        started.wait()
    """)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    arenas = {}
    for mode in ("limit", "default"):
        info = tmp_path / f"{mode}.xml"
        subprocess.run([sys.executable, "-c", script, mode, str(info)], check=True, env=env, timeout=60)
        arenas[mode] = info.read_text().count("<heap nr=")
    assert arenas["limit"] <= 2
    assert arenas["default"] >= 7  # the main thread's arena and one for each of the six threads


@pytest.mark.remote
def test_remote_workers_limit_arenas_at_start_and_trim_at_each_epoch_end(tmp_path, monkeypatch, object_store):
    calls = tmp_path / "calls"
    monkeypatch.setattr(workers, "limit_heap_arenas", lambda: _note(calls, "limit"))
    monkeypatch.setattr(workers, "trim_heap", lambda: _note(calls, "trim"))
    local = make_dataset(tmp_path / "data", rows=(40, 30, 50), payload=(100, 2000), seed=1)
    store = object_store(tmp_path, latency=0.001, rate=0)
    remote = StreamingDataset(store.url("s3", "data"), storage_options=store.storage_options(),
                              cache_dir=str(tmp_path / "cache"))
    loader = DataLoader(remote, batch_size=16, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        remote.set_epoch(epoch)
        assert sorted(keys_of(list(loader))) == [f"{i:06d}" for i in range(120)]
    del loader
    seen = calls.read_text().split()
    pids = set(seen[1::2])
    assert str(os.getpid()) not in pids and len(pids) == 2  # the two workers, never the training process
    for pid in pids:
        mine = [what for what, who in zip(seen[::2], seen[1::2]) if who == pid]
        assert mine == ["limit", "trim", "trim"]

    calls.unlink()  # torch's own DataLoader over the same dataset: workers iterate samples, not batches
    for epoch in range(2):
        remote.set_epoch(epoch)
        assert sum(len(b["key"]) for b in torch.utils.data.DataLoader(remote, batch_size=16, num_workers=2)) == 120
    seen = calls.read_text().split()
    assert sorted(seen[::2]) == ["limit"] * 4 + ["trim"] * 4 and str(os.getpid()) not in seen  # 2 workers a pass

    calls.unlink()
    local_loader = DataLoader(StreamingDataset(local), batch_size=16, num_workers=2)
    assert len(keys_of(list(local_loader))) == 120
    assert not calls.exists()  # local shards: no download threads, the heap left alone


def _note(path, what: str) -> bool:
    with open(path, "a") as f:
        f.write(f"{what} {os.getpid()}\n")
    return True
