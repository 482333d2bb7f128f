"""Raw sample bytes streamed through S3's API (moto_server on loopback) vs from local disk: no speed goal.

The S3 epoch starts with an empty cache, so every shard is downloaded while the epoch runs, through the same client
stoker uses against real S3. moto, a single-process Python server on the same cores, is far slower than S3 (and
than the page cache), so its figures say how close stoker gets to what moto can serve (parallel whole-object GETs,
no loader), not how fast remote reads are: that is `stream_remote.py`'s job, against nginx with S3's latency and
per-connection rate.

    .venv/bin/python benchmarks/stream_s3.py [--mb 256]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import os
import tempfile
import time
from pathlib import Path



def epoch_rate(loader) -> tuple[float, int]:
    start, nbytes = time.perf_counter(), 0
    for batch in loader:
        nbytes += sum(len(image) for image in batch["image"])
    return nbytes / (time.perf_counter() - start) / 1e6, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="dataset size in MB")
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--part-mb", type=float, default=None, help="ReadOptions.part_size (default: stoker's)")
    parser.add_argument("--prefetch-shards", type=int, default=None, help="ReadOptions.prefetch_shards")
    args = parser.parse_args()

    import stoker
    from stoker.testing import S3Server
    from stoker.dataloader.reader import ReadOptions
    from stream_local import make_bench_dataset

    with tempfile.TemporaryDirectory(prefix="stoker-s3-") as tmp, S3Server() as s3:
        local = os.path.join(tmp, "ds")
        os.makedirs(local)
        paths = make_bench_dataset(local, args.mb, shard_mb=args.shard_mb)
        s3.create_bucket("bench")
        s3.upload_dir(local, "s3://bench/ds")
        options = s3.storage_options()
        rows = stoker.Manifest.load(local).shards[0].rows
        window = 2 * rows  # a shuffle window of two shards, so the stream starts after two downloads
        read_options = ReadOptions()
        if args.part_mb:
            read_options = dataclasses.replace(read_options, part_size=int(args.part_mb * (1 << 20)))
        if args.prefetch_shards is not None:
            read_options = dataclasses.replace(read_options, prefetch_shards=args.prefetch_shards)
        kwargs = dict(batch_size=64, num_workers=args.workers, prefetch_factor=4)

        local_rate, nbytes = epoch_rate(stoker.DataLoader(stoker.StreamingDataset(local, shuffle_buffer=window), **kwargs))
        s3_ds = stoker.StreamingDataset("s3://bench/ds", shuffle_buffer=window, storage_options=options,
                                        cache_dir=os.path.join(tmp, "cache"), cache_limit=4 << 30, read=read_options)
        s3_rate, s3_bytes = epoch_rate(stoker.DataLoader(s3_ds, **kwargs))
        assert s3_bytes == nbytes

        client = s3.client()
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            got = sum(pool.map(lambda p: len(client.get_object(Bucket="bench", Key=f"ds/{Path(p).name}")["Body"].read()), paths))
        ceiling = got / (time.perf_counter() - start) / 1e6
        print(f"dataset: {len(paths)} shards of ~{args.shard_mb} MB, {nbytes / 1e6:.0f} MB of sample bytes")
        print(f"local disk (page cache), {args.workers} workers: {local_rate:8.0f} MB/s  (first epoch, workers starting)")
        print(f"S3 via moto, cold cache, {args.workers} workers: {s3_rate:8.0f} MB/s  (first epoch, every shard downloaded)")
        print(f"moto ceiling, 8 parallel GETs, no loader: {ceiling:8.0f} MB/s")
        print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"ratio S3 stream / moto ceiling: {s3_rate / ceiling:.2f}x (moto is the limit here; see stream_remote.py)")
        print(f"ratio s3/local: {s3_rate / local_rate:.2f}x")

if __name__ == "__main__":
    main()
