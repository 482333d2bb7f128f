"""Epoch plans at internet scale: time to the first batch and peak RSS at 1e9 samples, against a small dataset.

A simulated scale run: one 10,000-row image shard hard-linked 100,000 times, with a manifest listing every link
(1e9 samples; a fresh copy every 60,000 links, as ext4 allows 65,000). Each mode runs in a fresh process: samples one by one (StreamingDataset iterated
directly, and under a plain torch DataLoader with batch_size=256 or batch_size=None), stoker.DataLoader batches,
and a resume 70% into the epoch as rank 3 of 8. Prints, per mode, the first-batch time on the small dataset (one
shard) and on the simulated one, and the peak RSS (VmHWM) of the training process and of its largest worker.
Goal: first batch within 2 s of the small dataset's, every process under 1 GB.

    .venv/bin/python benchmarks/plan_scale.py [--shards 100000] [--rows 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MODES = ("samples", "torch-batch-256", "torch-batch-none", "stoker-batch-256", "resume-rank-3-of-8")

_CHILD = r"""
import json, os, sys, time
mode, root, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode.startswith("resume"):
    os.environ.update(RANK="3", WORLD_SIZE="8")
import torch
import stoker

def hwm(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0

def children():
    pids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += f.read().split()
    return pids

start = time.perf_counter()
ds = stoker.StreamingDataset(root, seed=0)
opened = time.perf_counter() - start
start = time.perf_counter()
if mode == "samples":
    it = iter(ds)
elif mode == "torch-batch-256":
    it = iter(torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers))
elif mode == "torch-batch-none":
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
else:
    loader = stoker.DataLoader(ds, batch_size=256, num_workers=workers)
    if mode.startswith("resume"):
        state = loader.state_dict()
        state["consumed"] = int(ds.manifest.num_samples * 0.7) // (256 * 8) * (256 * 8)
        loader.load_state_dict(state)
    it = iter(loader)
next(it)
first = time.perf_counter() - start
for _ in range(20):  # a few more, so every worker has planned and read
    if next(it, None) is None:
        break
worker_peak = max([hwm(pid) for pid in children()] or [0.0])
print(json.dumps({"open_s": opened, "first_s": first, "main_mb": hwm(), "worker_mb": worker_peak}))
"""


def make_dataset(root: str, shards: int, rows: int) -> int:
    """One real shard of `rows` tiny images, hard-linked `shards` times; a manifest listing every link."""
    from stoker.formats.manifest import Manifest, ShardInfo
    from stoker.formats.schema import describe, image_schema
    from stoker.formats.shard import create_writer

    schema = image_schema()
    first = os.path.join(root, "shard-0000000.arrow")
    writer = create_writer("arrow", first, schema, batch_bytes=1 << 20)
    rng = np.random.default_rng(0)
    for i in range(rows):
        writer.add({"key": f"{i:08d}", "label": i % 10, "image": rng.bytes(64), "height": 1, "width": 1})
    count, nbytes, sha = writer.close()
    names = [f"shard-{s:07d}.arrow" for s in range(shards)]
    source = first
    for s, name in enumerate(names[1:], 1):
        if s % 60_000 == 0:  # ext4 allows 65,000 links to one file: start from a fresh copy
            source = os.path.join(root, name)
            shutil.copyfile(first, source)
        else:
            os.link(source, os.path.join(root, name))
    infos = tuple(ShardInfo(name, count, nbytes, sha) for name in names)
    Manifest(kind="image", format="arrow", schema=describe(schema), shards=infos,
             classes=tuple(f"c{i}" for i in range(10))).save(root)
    return count * shards


def run(mode: str, root: str, workers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, root, str(workers)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stoker-plan-") as tmp:
        small, big = os.path.join(tmp, "small"), os.path.join(tmp, "big")
        os.makedirs(small)
        os.makedirs(big)
        make_dataset(small, 1, args.rows)
        start = time.perf_counter()
        total = make_dataset(big, args.shards, args.rows)
        print(f"simulated dataset: {total:.3g} samples in {args.shards:,} hard-linked shards "
              f"(manifest {os.path.getsize(os.path.join(big, 'manifest.json')) / 1e6:.1f} MB, "
              f"made in {time.perf_counter() - start:.1f} s); small: {args.rows:,} samples in 1 shard")
        print(f"{'mode':20} {'open s':>7} {'first s (small)':>16} {'first s (big)':>14} {'extra s':>8} "
              f"{'main MB':>8} {'worker MB':>10}")
        worst_extra, worst_mb = 0.0, 0.0
        for mode in args.modes:
            a, b = run(mode, small, args.workers), run(mode, big, args.workers)
            extra = b["first_s"] - a["first_s"]
            worst_extra, worst_mb = max(worst_extra, extra), max(worst_mb, b["main_mb"], b["worker_mb"])
            print(f"{mode:20} {b['open_s']:7.2f} {a['first_s']:16.2f} {b['first_s']:14.2f} {extra:8.2f} "
                  f"{b['main_mb']:8.0f} {b['worker_mb']:10.0f}")
        print(f"first batch at {total:.0e} samples, worst mode, minus the small dataset's: {worst_extra:.2f} s "
              "(goal <= 2 s)")
        print(f"largest process at {total:.0e} samples: {worst_mb:.0f} MB (goal < 1024 MB)")


if __name__ == "__main__":
    main()
