"""Raw sample bytes streamed from local shards by stoker.DataLoader (2 workers) vs `cat` of the same files.

Both read from the page cache (the files are written, then read once before timing), so this measures the
loader's own overhead: shuffling, planning rows from the mapped record batches, moving batches between processes.
Bytes of local Arrow shards are not copied: the training process maps the same file pages and gets views of them,
so delivery does not touch the bytes. A second measurement has the training loop read every byte once (a numpy
pass, what a decoder does at least) and compares it with the same pass over the same bytes already in memory.
Prints MB/s for each and, on the last line, the ratio stoker / cat (goal: >= 0.8).

    .venv/bin/python benchmarks/stream_local.py [--mb 768] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np

from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.schema import describe, image_schema
from stoker.formats.shard import create_writer


def make_bench_dataset(root: str, total_mb: int, shard_mb: int = 64, mean_kb: int = 110, seed: int = 0) -> list[str]:
    """Image-like shards of random bytes (JPEG-sized samples); returns the shard paths."""
    rng = np.random.default_rng(seed)
    schema = image_schema()
    pool = rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()  # samples are slices of one random pool
    shards, paths, index = [], [], 0
    for s in range(max(1, total_mb // shard_mb)):
        name = f"shard-{s:05d}.arrow"
        path = os.path.join(root, name)
        writer = create_writer("arrow", path, schema)
        written = 0
        while written < shard_mb << 20:
            size = int(rng.integers(mean_kb * 512, mean_kb * 1536))
            start = int(rng.integers(0, len(pool) - size))
            writer.add({"key": f"{index:08d}", "label": index % 1000, "image": pool[start:start + size],
                        "height": 224, "width": 224})
            written += size
            index += 1
        rows, nbytes, sha = writer.close()
        shards.append(ShardInfo(name, rows, nbytes, sha))
        paths.append(path)
    Manifest(kind="image", format="arrow", schema=describe(schema), shards=tuple(shards)).save(root)
    return paths


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by this process, its finished children, and the live `pids`."""
    import psutil

    total = sum(getattr(os.times(), f) for f in ("user", "system", "children_user", "children_system"))
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def time_cat(paths: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `cat paths > /dev/null`."""
    cpu, start = cpu_seconds([]), time.perf_counter()
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start, cpu_seconds([]) - cpu


def read_all(images) -> int:
    """Read every byte of `images` once (a sum over 8-byte words), as any consumer of the bytes must."""
    return sum(int(np.frombuffer(image, np.uint64, len(image) // 8).sum()) for image in images)


def time_stoker(loader, epochs: int, pids: list[int] = (), read: bool = False) -> tuple[list[float], int, float]:
    """(wall seconds per epoch, sample bytes per epoch, CPU seconds of this process and `pids`)."""
    times, nbytes, cpu = [], 0, cpu_seconds(list(pids))
    for _ in range(epochs):
        start = time.perf_counter()
        nbytes = 0
        for batch in loader:
            nbytes += sum(len(image) for image in batch["image"])
            if read:
                read_all(batch["image"])
        times.append(time.perf_counter() - start)
    return times, nbytes, cpu_seconds(list(pids)) - cpu


def time_read_in_memory(paths: list[str]) -> float:
    """Seconds of `read_all` over every sample of the shards, held in memory: the consumer's own speed of light."""
    import pyarrow as pa

    images = []
    for path in paths:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        column = table.column("image").combine_chunks()
        data = np.frombuffer(column.buffers()[2], np.uint8).copy()  # plain memory, not a file mapping
        offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset:column.offset + len(column) + 1]
        images += [memoryview(data[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        read_all(images)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=768, help="dataset size in MB")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import stoker

    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as root:
        paths = make_bench_dataset(root, args.mb)
        file_bytes = sum(os.path.getsize(p) for p in paths)
        time_cat(paths)  # page cache warm-up
        ds = stoker.StreamingDataset(root, seed=0)
        loader = stoker.DataLoader(ds, batch_size=64, num_workers=args.workers, persistent_workers=True, prefetch_factor=4)
        time_stoker(loader, 1)  # workers started, page cache warm
        import psutil

        workers = [p.pid for p in psutil.Process().children() if p.name() != "cat"]
        cat_times, stoker_times, cat_cpu, stoker_cpu = [], [], 0.0, 0.0
        for _ in range(args.epochs):  # interleaved, so both see the same machine load
            wall, cpu = time_cat(paths)
            cat_times.append(wall)
            cat_cpu += cpu
            times, payload, cpu = time_stoker(loader, 1, workers)
            stoker_times += times
            stoker_cpu += cpu
        read_times, _, _ = time_stoker(loader, args.epochs, read=True)
        in_memory = time_read_in_memory(paths)
        cat_rate = file_bytes / statistics.median(cat_times) / 1e6
        stoker_rate = payload / statistics.median(stoker_times) / 1e6
        read_rate = payload / statistics.median(read_times) / 1e6
        memory_rate = payload / in_memory / 1e6
        gb = args.epochs / 1e9
        print(f"dataset: {len(paths)} shards, {file_bytes / 1e6:.0f} MB, {len(ds)} samples, {payload / 1e6:.0f} MB of sample bytes")
        print(f"cat to /dev/null:        {cat_rate:8.0f} MB/s  {cat_cpu / (file_bytes * gb):.2f} CPU-s/GB  "
              f"(wall {[round(t, 3) for t in cat_times]} s)")
        print(f"stoker, {args.workers} workers, b=64: {stoker_rate:8.0f} MB/s  {stoker_cpu / (payload * gb):.2f} CPU-s/GB  "
              f"(wall {[round(t, 3) for t in stoker_times]} s; CPU of main + workers)")
        print(f"stoker + loop reads every byte: {read_rate:8.0f} MB/s; the same read of the bytes in memory "
              f"{memory_rate:.0f} MB/s: {read_rate / memory_rate:.2f}x of the consumer's own limit")
        print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"ratio stoker/cat: {stoker_rate / cat_rate:.2f}x")

if __name__ == "__main__":
    main()
