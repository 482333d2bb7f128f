"""Raw sample bytes streamed from S3 (moto_server on loopback, 20 ms added to every request) vs from local disk.

A small asyncio TCP proxy, in its own process, holds every byte a client sends for 20 ms before passing it on, so
each request pays a round trip like a real object store; responses stream through undelayed. The S3 epoch starts
with an empty cache, so every shard is downloaded while the epoch runs: only prefetching and parallel reads hide
the latency. Also measured: the server's own ceiling (parallel whole-object GETs through the same proxy, no
loader), since moto, a pure-Python server, is far slower than real S3. The last line is the ratio S3 / local
(goal: >= 0.9).

    .venv/bin/python benchmarks/stream_s3.py [--mb 256] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


async def _proxy(listen_port: int, target_port: int, delay: float, ready: mp.Event) -> None:
    loop = asyncio.get_running_loop()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, pause: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump() -> None:
            while data := await src.read(1 << 16):
                queue.put_nowait((loop.time() + pause, data))  # each chunk leaves `pause` after it arrived
            queue.put_nowait((0.0, b""))

        async def drain() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(), drain())
        except (ConnectionError, OSError):
            dst.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    ready.set()
    async with server:
        await server.serve_forever()


def _run_proxy(listen_port: int, target_port: int, delay: float, ready: mp.Event) -> None:
    asyncio.run(_proxy(listen_port, target_port, delay, ready))


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delays client-to-server bytes by `delay` seconds (own process)."""

    def __init__(self, target_port: int, delay: float) -> None:
        from s3_server import free_port

        self.port = free_port()
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        self.process = ctx.Process(target=_run_proxy, args=(self.port, target_port, delay, ready), daemon=True)
        self.process.start()
        if not ready.wait(30):
            raise RuntimeError("delay proxy did not start within 30 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def epoch_rate(loader) -> tuple[float, int]:
    start, nbytes = time.perf_counter(), 0
    for batch in loader:
        nbytes += sum(len(image) for image in batch["image"])
    return nbytes / (time.perf_counter() - start) / 1e6, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="dataset size in MB")
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--part-mb", type=float, default=None, help="ReadOptions.part_size (default: stoker's)")
    parser.add_argument("--prefetch-shards", type=int, default=None, help="ReadOptions.prefetch_shards")
    args = parser.parse_args()

    import stoker
    from s3_server import S3Server
    from stoker.dataloader.reader import ReadOptions
    from stream_local import make_bench_dataset

    with tempfile.TemporaryDirectory(prefix="stoker-s3-") as tmp, S3Server() as s3:
        local = os.path.join(tmp, "ds")
        os.makedirs(local)
        paths = make_bench_dataset(local, args.mb, shard_mb=args.shard_mb)
        s3.create_bucket("bench")
        s3.upload_dir(local, "s3://bench/ds")
        proxy = DelayProxy(s3.port, args.delay_ms / 1000)
        try:
            delayed = s3.storage_options()
            delayed["client_kwargs"]["endpoint_url"] = f"http://127.0.0.1:{proxy.port}"
            rows = stoker.Manifest.load(local).shards[0].rows
            window = 2 * rows  # a shuffle window of two shards, so the stream starts after two downloads
            read_options = ReadOptions()
            if args.part_mb:
                read_options = dataclasses.replace(read_options, part_size=int(args.part_mb * (1 << 20)))
            if args.prefetch_shards is not None:
                read_options = dataclasses.replace(read_options, prefetch_shards=args.prefetch_shards)
            kwargs = dict(batch_size=64, num_workers=args.workers, prefetch_factor=4)

            local_rate, nbytes = epoch_rate(stoker.DataLoader(stoker.StreamingDataset(local, shuffle_buffer=window), **kwargs))
            s3_ds = stoker.StreamingDataset("s3://bench/ds", shuffle_buffer=window, storage_options=delayed,
                                            cache_dir=os.path.join(tmp, "cache"), cache_limit=4 << 30,
                                            read=read_options)
            s3_rate, s3_bytes = epoch_rate(stoker.DataLoader(s3_ds, **kwargs))
            assert s3_bytes == nbytes

            client = s3.client()
            client.meta.endpoint_url  # noqa: B018 (the plain client goes straight to moto; the one below via the proxy)
            import boto3

            via_proxy = boto3.client("s3", endpoint_url=delayed["client_kwargs"]["endpoint_url"], aws_access_key_id="testing",
                                     aws_secret_access_key="testing", region_name="us-east-1")
            start = time.perf_counter()
            with cf.ThreadPoolExecutor(8) as pool:
                got = sum(pool.map(lambda p: len(via_proxy.get_object(Bucket="bench", Key=f"ds/{Path(p).name}")["Body"].read()), paths))
            ceiling = got / (time.perf_counter() - start) / 1e6
        finally:
            proxy.stop()
        print(f"dataset: {len(paths)} shards of ~{args.shard_mb} MB, {nbytes / 1e6:.0f} MB of sample bytes; "
              f"{args.delay_ms:.0f} ms added to every S3 request")
        print(f"local disk (page cache), {args.workers} workers: {local_rate:8.0f} MB/s  (first epoch, workers starting)")
        print(f"S3 via moto, cold cache, {args.workers} workers: {s3_rate:8.0f} MB/s  (first epoch, every shard downloaded)")
        print(f"moto ceiling, 8 parallel GETs, no loader: {ceiling:8.0f} MB/s  -> S3 stream / server ceiling: {s3_rate / ceiling:.2f}x")
        print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"ratio s3/local: {s3_rate / local_rate:.2f}x")


if __name__ == "__main__":
    main()
