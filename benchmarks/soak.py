"""Soak: many epochs with persistent workers over local data, S3 (moto on loopback) and an object store with S3's
latency (nginx, 20 ms first byte, 100 MB/s per connection: stoker.testing); resources must stay flat.

Per epoch it prints samples/s, the main process's RSS, the workers' summed RSS, open file descriptors and threads
(main process plus workers). The verdict compares the last epoch with the second (the first warms caches and pools):
goal RSS growth < 50 MB (main and workers each), no growth in file descriptors or threads, and every epoch delivers
every sample exactly once.

    .venv/bin/python benchmarks/soak.py                 # a few minutes: 2 x 30 epochs
    .venv/bin/python benchmarks/soak.py --epochs 300    # longer
    .venv/bin/python benchmarks/soak.py --only local --epochs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stoker.synthetic import keys_of, make_dataset
from stoker.testing import S3Server

from stoker import DataLoader, StreamingDataset
from stoker.dataloader import ReadOptions
from stoker.testing import ObjectStore

MB = 1 << 20


def usage(proc: psutil.Process, exclude: set[int]) -> tuple[float, float, int, int]:
    """(main RSS MB, workers' RSS MB, fds, threads) of this process and its live children (not the S3 server)."""
    children = [c for c in proc.children(recursive=True) if c.is_running() and c.pid not in exclude]
    workers_rss = fds = threads = 0
    for child in children:
        try:
            workers_rss += child.memory_info().rss
            fds += child.num_fds()
            threads += child.num_threads()
        except psutil.Error:
            pass
    return proc.memory_info().rss / MB, workers_rss / MB, fds + proc.num_fds(), threads + proc.num_threads()


def soak(name: str, source: str, epochs: int, workers: int, total: int, exclude: set[int] = frozenset(),
         **kwargs) -> bool:
    ds = StreamingDataset(source, shuffle_buffer=2000, **kwargs)
    loader = DataLoader(ds, batch_size=64, num_workers=workers, persistent_workers=True)
    expected = [f"{i:06d}" for i in range(total)]
    me = psutil.Process()
    rows = []
    print(f"\n{name}: {epochs} epochs, {workers} persistent workers, {total} samples")
    print(f"{'epoch':>5} {'samples/s':>10} {'main MB':>8} {'workers MB':>10} {'fds':>5} {'threads':>7}")
    exact = True
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        keys = keys_of(list(loader))
        rate = len(keys) / (time.perf_counter() - start)
        exact &= sorted(keys) == expected
        rows.append((rate, *usage(me, exclude)))
        print(f"{epoch:>5} {rate:>10.0f} {rows[-1][1]:>8.1f} {rows[-1][2]:>10.1f} {rows[-1][3]:>5} {rows[-1][4]:>7}",
              flush=True)
    del loader
    # RSS: last epoch vs epoch 1 (epoch 0 warms up). fds and threads move with in-flight downloads (S3 connections
    # and cache files: 148-165 fds from epoch to epoch in one run), so compare the median of the second half of the
    # run with the median of the first (epoch 0 left out): a leak of one per epoch would add about half the epochs.
    base, last = rows[min(1, len(rows) - 1)], rows[-1]
    half = max(2, (len(rows) + 1) // 2)
    early, late = rows[1:half] or rows, rows[half:] or rows
    growth = (last[1] - base[1], last[2] - base[2],
              *(round(statistics.median(r[i] for r in late) - statistics.median(r[i] for r in early)) for i in (3, 4)))
    flat = growth[0] < 50 and growth[1] < 50 and growth[2] <= 2 and growth[3] <= 0
    print(f"{name}: growth epoch 1 -> {len(rows) - 1} (fds, threads: median of 2nd half vs 1st): main {growth[0]:+.1f} MB, workers {growth[1]:+.1f} MB, "
          f"fds {growth[2]:+d}, threads {growth[3]:+d}; exactly once every epoch: {exact}; "
          f"{'FLAT' if flat and exact else 'NOT FLAT'}")
    return flat and exact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--rows", type=int, default=400, help="samples per shard")
    parser.add_argument("--only", choices=["local", "s3", "store"])
    args = parser.parse_args()
    total = args.shards * args.rows
    ok = True
    with tempfile.TemporaryDirectory(prefix="stoker-soak-") as tmp:
        local = make_dataset(Path(tmp) / "data", rows=(args.rows,) * args.shards, payload=(500, 3000),
                             batch_bytes=64 << 10)
        size = sum(f.stat().st_size for f in Path(local).iterdir())
        if args.only in (None, "local"):
            ok &= soak("local", local, args.epochs, args.workers, total)
        if args.only in (None, "store"):
            with ObjectStore(tmp, latency=0.02, rate=100e6) as store:
                nginx = psutil.Process(store.process.pid)
                # A cache smaller than the dataset: every epoch evicts and downloads again, through obstore.
                ok &= soak("store", store.url("s3", "data"), args.epochs, args.workers, total,
                           exclude={nginx.pid, *(c.pid for c in nginx.children(recursive=True))},
                           storage_options=store.storage_options(), cache_dir=os.path.join(tmp, "store-cache"),
                           cache_limit=size // 2)
        if args.only in (None, "s3"):
            with S3Server() as s3:
                s3.create_bucket("data")
                s3.upload_dir(local, "s3://data/ds")
                # A cache smaller than the dataset: every epoch evicts and downloads again.
                ok &= soak("s3", "s3://data/ds", args.epochs, args.workers, total, exclude={s3.process.pid},
                           storage_options=s3.storage_options(), cache_dir=os.path.join(tmp, "cache"),
                           cache_limit=size // 2, read=ReadOptions(part_size=256 << 10))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
