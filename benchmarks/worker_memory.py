"""Worker memory over epochs: RSS of each stoker.DataLoader worker after every epoch (persistent workers).

A loader that keeps per-sample metadata in Python lists grows worker RSS epoch after epoch (copy-on-read of the
lists' pages); stoker keeps it in numpy arrays and Arrow buffers, and reuses its shared-memory slabs. The dataset
has many small text samples, which is where per-sample Python objects would show. Prints RSS per epoch and, on
the last line, the largest growth from epoch 1 to the last epoch (goal: < 50 MB).

    .venv/bin/python benchmarks/worker_memory.py [--samples 400000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_text_dataset(root: str, samples: int, shards: int = 8, seed: int = 0) -> None:
    from stoker.formats.manifest import Manifest, ShardInfo
    from stoker.formats.schema import describe, text_schema
    from stoker.formats.shard import create_writer

    rng = np.random.default_rng(seed)
    schema = text_schema(np.dtype(np.uint16))
    lengths = rng.integers(8, 120, samples)
    infos, index = [], 0
    for s in range(shards):
        name = f"shard-{s:05d}.arrow"
        writer = create_writer("arrow", os.path.join(root, name), schema, batch_bytes=1 << 20)
        count = samples // shards + (s < samples % shards)
        for n in lengths[index:index + count].tolist():
            writer.add({"key": f"doc-{index:08d}", "tokens": np.full(n, index % 65536, np.uint16), "length": n})
            index += 1
        rows, nbytes, sha = writer.close()
        infos.append(ShardInfo(name, rows, nbytes, sha, lengths[index - rows:index].astype(np.uint32)))
    Manifest(kind="text", format="arrow", schema=describe(schema), shards=tuple(infos), token_dtype="uint16").save(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import psutil

    import stoker

    with tempfile.TemporaryDirectory(prefix="stoker-mem-") as root:
        start = time.perf_counter()
        make_text_dataset(root, args.samples)
        print(f"dataset: {args.samples} samples written in {time.perf_counter() - start:.1f} s")
        ds = stoker.StreamingDataset(root, seed=0)
        loader = stoker.DataLoader(ds, batch_size=256, num_workers=args.workers, persistent_workers=True)
        history: dict[int, list[float]] = {}
        for epoch in range(args.epochs):
            start, samples = time.perf_counter(), 0
            for batch in loader:
                samples += len(batch["key"])
            pids = [p.pid for p in psutil.Process().children() if p.is_running() and p.name() != "moto_server"]
            for pid in pids:
                history.setdefault(pid, []).append(psutil.Process(pid).memory_info().rss / 2**20)
            assert samples == args.samples, samples
            rss = ", ".join(f"{h[-1]:.1f}" for h in history.values())
            print(f"epoch {epoch + 1:2d}: {samples} samples in {time.perf_counter() - start:5.1f} s; worker RSS MB: {rss}")
        growth = max(h[-1] - h[0] for h in history.values())
        print(f"worker RSS growth, epoch 1 to {args.epochs}: {growth:.1f} MB (goal < 50 MB)")


if __name__ == "__main__":
    main()
