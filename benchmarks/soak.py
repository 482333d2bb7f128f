"""Soak: many epochs with persistent workers over local data, S3 (moto on loopback) and an object store with S3's
latency (nginx, 20 ms first byte, 100 MB/s per connection: stoker.testing); resources must stay flat.

Per epoch it prints samples/s, the anonymous RSS (heap, stacks: RssAnon, what a leak or a creeping allocator grows;
mapped shard files and shared-memory slabs come and go with what is mapped) of the main process and of the workers
together, open file descriptors and threads (main process plus workers), and for remote legs the bytes of complete
files in the shard cache. The verdict, FLAT only when all of these hold:
  - every epoch delivers every sample exactly once;
  - memory (main, and the workers together): under 50 MB of growth from epoch 1 to the last (epoch 0 warms caches
    and pools), and still-growing memory caught: the mean of the last 3 epochs exceeds the mean of the 3 epochs
    in the middle of the run by under 1 MB per process; judged only over at least 10 epochs;
  - file descriptors and threads: the median of the second half of the run is no higher than the median of the
    first (epoch 0 left out), fds within 2 (they move with in-flight downloads);
  - the shard cache never holds more than its limit at an epoch's end.

    .venv/bin/python benchmarks/soak.py                 # a few minutes: 3 x 30 epochs
    .venv/bin/python benchmarks/soak.py --epochs 300    # longer
    .venv/bin/python benchmarks/soak.py --only store --epochs 12
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


MIN_EPOCHS = 10  # fewer cannot tell a warm-up from a leak
STILL_GROWING_MB = 1.0  # per process: last 3 epochs against the 3 in the middle of the run
TOTAL_GROWTH_MB = 50.0


def anon_mb(pid: int) -> float:
    """RssAnon of `pid` in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def usage(proc: psutil.Process, exclude: set[int]) -> tuple[float, float, int, int, int]:
    """(main anon MB, workers' anon MB, fds, threads, workers) of this process and its live children (not the servers)."""
    children = [c for c in proc.children(recursive=True) if c.is_running() and c.pid not in exclude]
    workers_anon = 0.0
    fds = threads = 0
    for child in children:
        try:
            workers_anon += anon_mb(child.pid)
            fds += child.num_fds()
            threads += child.num_threads()
        except psutil.Error:
            pass
    return anon_mb(proc.pid), workers_anon, fds + proc.num_fds(), threads + proc.num_threads(), len(children)


def cache_bytes(directory: str | None) -> int:
    """Bytes of the complete entries in a shard cache (temporary files of fills in progress left out)."""
    if directory is None or not os.path.isdir(directory):
        return 0
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file() and not e.name.startswith("."))


def still_growing(values: list[float]) -> float:
    """Mean of the last 3 values minus the mean of the 3 in the middle."""
    mid = len(values) // 2
    return statistics.mean(values[-3:]) - statistics.mean(values[mid - 1:mid + 2])


def soak(name: str, source: str, epochs: int, workers: int, total: int, exclude: set[int] = frozenset(),
         **kwargs) -> bool:
    ds = StreamingDataset(source, shuffle_buffer=2000, **kwargs)
    loader = DataLoader(ds, batch_size=64, num_workers=workers, persistent_workers=True)
    cache_dir, limit = kwargs.get("cache_dir"), kwargs.get("cache_limit")
    expected = [f"{i:06d}" for i in range(total)]
    me = psutil.Process()
    rows = []
    print(f"\n{name}: {epochs} epochs, {workers} persistent workers, {total} samples"
          + (f", cache limit {limit / MB:.1f} MB" if limit else ""))
    print(f"{'epoch':>5} {'samples/s':>10} {'main anon MB':>12} {'workers anon MB':>15} {'fds':>5} {'threads':>7}"
          f" {'cache MB':>8}")
    exact = True
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        keys = keys_of(list(loader))
        rate = len(keys) / (time.perf_counter() - start)
        exact &= sorted(keys) == expected
        rows.append((rate, *usage(me, exclude), cache_bytes(cache_dir)))
        print(f"{epoch:>5} {rate:>10.0f} {rows[-1][1]:>12.1f} {rows[-1][2]:>15.1f} {rows[-1][3]:>5} {rows[-1][4]:>7}"
              f" {rows[-1][6] / MB:>8.1f}", flush=True)
    del loader
    processes = max(r[5] for r in rows)
    base, last = rows[min(1, len(rows) - 1)], rows[-1]
    half = max(2, (len(rows) + 1) // 2)
    early, late = rows[1:half] or rows, rows[half:] or rows
    growth = (last[1] - base[1], last[2] - base[2],
              *(round(statistics.median(r[i] for r in late) - statistics.median(r[i] for r in early)) for i in (3, 4)))
    judged = len(rows) >= MIN_EPOCHS
    creep = (still_growing([r[1] for r in rows]), still_growing([r[2] for r in rows])) if judged else (0.0, 0.0)
    memory = (growth[0] < TOTAL_GROWTH_MB and growth[1] < TOTAL_GROWTH_MB and creep[0] < STILL_GROWING_MB
              and creep[1] < STILL_GROWING_MB * processes)
    cache_max = max(r[6] for r in rows)
    cached = limit is None or cache_max <= limit
    flat = judged and memory and growth[2] <= 2 and growth[3] <= 0 and cached and exact
    verdict = "FLAT" if flat else f"NOT FLAT{'' if judged else f' (too short to judge: under {MIN_EPOCHS} epochs)'}"
    print(f"{name}: anon memory growth epoch 1 -> {len(rows) - 1}: main {growth[0]:+.1f} MB, workers {growth[1]:+.1f} MB"
          + (f"; last 3 epochs vs middle 3: main {creep[0]:+.1f} MB, workers {creep[1]:+.1f} MB ({processes} processes)"
             if judged else "")
          + f"; fds {growth[2]:+d}, threads {growth[3]:+d} (median of 2nd half vs 1st)"
          + (f"; cache at most {cache_max / MB:.1f} of {limit / MB:.1f} MB" if limit else "")
          + f"; exactly once every epoch: {exact}; {verdict}")
    return flat


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
