"""Packing at scale on one machine: N array parts as processes, and the Ray engine vs the local process pool.

  * `--part I/N` with N = 1, 2, 4 processes (`--workers 1` each, as one array task per core), then `stoker merge`;
    samples/s counts the wall time of all parts plus the merge (which re-reads every shard to verify it).
  * `pack-dataset` with the local process pool vs `--engine ray` with as many Ray CPUs, on the same input.
    Ray's start-up (a one-off per cluster, ~10 s here) is timed apart and left out of the ratio.

Goal: Ray within 0.8x of the local run. Prints the ratio on the last line. Each timing is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _data

from stoker.formats.merge import merge
from stoker.formats.pack import pack_dataset

PACK = [sys.executable, "-c", "import sys; from stoker.cli import pack_main; sys.exit(pack_main())"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--shard-size", default="4MB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shard_bytes = int(args.shard_size.rstrip("MB")) << 20

    src = _data.image_tree(per_class=args.per_class)
    count, nbytes = sum(1 for _ in src.rglob("*.jpg")), _data.tree_bytes(src)
    work = Path(tempfile.mkdtemp(prefix="stoker-bench-scale-"))
    subprocess.run(["cat", *map(str, src.rglob("*.jpg"))], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    rows: list[tuple[str, float]] = []
    merge_s: dict[int, list[float]] = {}

    def parts(n: int):
        def run() -> None:
            dst = work / f"parts-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            procs = [subprocess.Popen([*PACK, str(src), str(dst), "--workers", "1", "--shard-size", args.shard_size,
                                       "--quiet", "--part", f"{i}/{n}"], stdout=subprocess.DEVNULL) for i in range(n)]
            if [p.wait() for p in procs] != [0] * n:
                raise SystemExit(f"a part of {n} failed")
            start = time.perf_counter()
            merge(str(dst))
            merge_s.setdefault(n, []).append(time.perf_counter() - start)
        return run

    def pack(engine: str):
        def run() -> None:
            pack_dataset(str(src), str(work / engine), workers=args.workers, shard_size=shard_bytes, engine=engine,
                         overwrite=True, progress=False)
        return run

    try:
        for n in (1, 2, 4):
            rows.append((f"{n} part(s) x 1 worker + merge", _data.best_of(args.repeats, parts(n))))
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - start
        try:
            # Alternate the two engines, so a burst of load from other jobs on the machine hits both alike.
            timings: dict[str, list[float]] = {"local": [], "ray": []}
            for _ in range(args.repeats):
                for engine in timings:
                    timings[engine].append(_data.best_of(1, pack(engine)))
        finally:
            ray.shutdown()
        local_s, ray_s = min(timings["local"]), min(timings["ray"])
        rows += [(f"local engine, {args.workers} workers", local_s), (f"ray engine, {args.workers} CPUs", ray_s)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"input: {count} JPEGs, {nbytes / 1e6:.1f} MB, {args.shard_size} shards, {os.cpu_count()} cores, best of {args.repeats}")
    for name, secs in rows:
        print(f"{name:34s} {secs:7.3f} s  {count / secs:9,.0f} samples/s  {nbytes / secs / 1e6:8.1f} MB/s")
    print("of which merge (verifies every shard): " + ", ".join(f"{n} parts {min(t):.2f} s" for n, t in merge_s.items()))
    print(f"ray start-up (not counted above): {ray_start_s:.1f} s")
    print(f"ratio ray / local samples/s: {local_s / ray_s:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
