"""Packed JPEG shards read from a loopback object store with S3's shape, against plain clients and local disk.

The store is nginx (`stoker.testing`): a first-byte delay on every request and 100 MB/s per
connection, costing almost no CPU, so it is not itself the limit. On the same >= 400 MB packed image dataset, at each
latency (5, 20, 80 ms):

  ceiling   plain parallel 8 MB ranged GETs of every shard, no loader: s3fs with 16 threads, obstore with 16 and 32
  store     stoker.StreamingDataset + stoker.DataLoader (2 workers, raw bytes, batch 64), cold cache: every shard
            is downloaded during the epoch
  local     the same loader over the local directory (page cache)

The store leg is run twice: with the cache on this machine's temporary directory (a disk here) and on /dev/shm
(tmpfs: no writeback), each with the CPU of kernel threads (writeback, journal, softirq: outside every process's own
accounting) counted through a `sync` after the epoch.

plus the time to the first batch (cold store vs local; also from a fresh interpreter, where the imports and the
manifest's read count), and the full image pipeline (stoker's PIL decode + random
resized crop + flip as the collate_fn, 2 workers) from the store vs from local disk at 20 and 80 ms, with the cache
on the temporary directory and on /dev/shm, each against its CPU bound. Every ratio is taken within this one run.

On a small machine the raw-bytes leg is a CPU budget: the client, nginx and stoker share the same cores. Each
latency's "CPU budget" line adds what the best plain client and nginx spent per GB, what writing a GB into the
cache costs here (stoker's own download loop fed from memory, measured in this run) and what stoker's loader spent
per GB on local data (the local leg): the fastest a loader with a cache could stream if its download were as cheap as
the plain client's, on idle cores, and the best ratio that allows.

    .venv/bin/python benchmarks/stream_remote.py [--per-class 880] [--latencies 5 20 80] [--pipeline-latencies 20 80]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time

import _data

PART = 8 << 20
SIZE = 224


def _processes() -> list[tuple[int, int, float]]:
    """(pid, parent pid, CPU seconds user + system so far) of every process and kernel thread."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        found.append((int(entry), int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its children so far (nginx's master and its workers)."""
    return sum(cpu for p, parent, cpu in _processes() if pid in (p, parent))


def kernel_threads_cpu() -> dict[int, float]:
    """CPU seconds so far of each kernel thread (children of kthreadd, pid 2), by pid: writeback (kworker/flush),
    journal (jbd2) and softirq threads, which no process's own accounting includes. By pid, because a kworker's
    name changes with the work it runs."""
    return {p: cpu for p, parent, cpu in _processes() if parent == 2}


def kernel_since(before: dict[int, float]) -> float:
    """CPU seconds kernel threads spent since `before` (`kernel_threads_cpu()`); threads started since count whole."""
    return sum(max(0.0, now - before.get(pid, 0.0)) for pid, now in kernel_threads_cpu().items())


def cache_write_cpu(directory: str, nbytes: int = 128 << 20, shard: int = 32 << 20, rounds: int = 5) -> float:
    """CPU seconds per GB that stoker's download loop (`cache.download`: 8 MB parts, pwrite, fsync) spends writing
    into cache files in `directory`, fed from memory: the cache's share of a cold read on this machine. The cheapest
    of `rounds` (a busy disk or page cache makes some rounds dearer; the budget takes the best case)."""
    from stoker import cache

    # 128 MB of distinct parts, like bytes fresh from the network (not one part kept hot in the CPU's caches).
    parts = [memoryview(os.urandom(PART)) for _ in range(16)]
    per_shard = shard // PART
    pool = cache.IOPool(8, "bench-write")
    costs, files = [], []
    for _ in range(rounds):
        start = _cpu()
        for i in range(nbytes // shard):
            # Files are kept until the end: each round writes into pages no earlier round freed, as a cold epoch's
            # new cache entries do.
            files.append(os.path.join(directory, f"write-cost-{len(files)}"))
            cache.download(lambda a, b, i=i: parts[(i * per_shard + a // PART) % len(parts)][:b - a],
                           files[-1], shard, pool=pool, part_size=PART, parallel=8,
                           attempts=1, backoff=0, deadline=time.monotonic() + 600, what="write cost", sha256=False)
        costs.append((_cpu() - start) / (nbytes / 1e9))
    pool.close()
    for path in files:
        os.remove(path)
    return min(costs)


def _bound(achieved: float, possible: float, reference: float, cores: int, write_cpu: float) -> str:
    """The best ratio to `reference` that the run's CPU budget allows, or why this run gives none: a budget that
    stoker beat was measured dearer than stoker's own run found it (writing the cache swings from run to run)."""
    if achieved > possible:
        return (f"no bound from this run: stoker beat its CPU budget, whose cost of writing the cache ({write_cpu:.2f} "
                "CPU-s/GB) was measured in a dearer moment")
    return f"best possible on {cores} CPUs {min(1.0, possible / reference):.2f}x"


def pipeline_bound(achieved: float, local: float, local_cpu: float, transfer_gb: float, write_gb: float,
                   gb_per_image: float, latency: float) -> str:
    """The best ratio to the local pipeline that the CPUs allow (printed with its parts): the local pipeline's CPU
    per image plus the CPU-s/GB of the transfer (the best plain client and nginx) and of the cache's writes for each
    image's bytes, on every core; and what a loader without any cache could reach at best."""
    cores = os.cpu_count() or 1
    transfer_cpu, write_cpu = transfer_gb * gb_per_image, write_gb * gb_per_image
    possible = cores / (local_cpu + transfer_cpu + write_cpu)
    cacheless = cores / (local_cpu + transfer_cpu)
    print(f"CPU bound of the image pipeline from the store at {latency:g} ms: {local_cpu * 1e3:.2f} CPU-ms per image "
          f"locally + {transfer_cpu * 1e3:.2f} to download its bytes (best client and nginx) + {write_cpu * 1e3:.2f} to "
          f"write them into the cache -> at most {possible:,.0f} img/s on {cores} CPUs ({cacheless:,.0f} with no cache "
          f"at all, {min(1.0, cacheless / local):.2f}x local)"
          + (" (stoker beat it: no bound from this run)" if achieved > possible else ""), flush=True)
    return _bound(achieved, possible, local, cores, write_gb)


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is on (the longest mount point above it in /proc/mounts), e.g. "ext4"."""
    best, kind = "", "unknown filesystem"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fstype
    return f"{kind} ({best})"


def client_rates(endpoint_url: str, bucket: str, prefix: str, shards: list[tuple[str, int]],
                 server: int) -> dict[str, tuple[float, float, float]]:
    """(MB/s, client CPU-s/GB, server CPU-s/GB) of plain parallel 8 MB ranged GETs of every shard under `prefix`:
    s3fs 16 threads, obstore 16 and 32; `server` is the pid of nginx's master.

    Run in a spawned process: obstore's runtime threads would not survive the loader's forks in this one (stoker
    then reads through fsspec in its workers, as it must).
    """
    import obstore
    import s3fs
    from obstore.store import S3Store

    spans = [(name, s, min(s + PART, size)) for name, size in shards for s in range(0, size, PART)]
    total = sum(size for _, size in shards)
    fs = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": endpoint_url, "region_name": "us-east-1"},
                           config_kwargs={"max_pool_connections": 64})
    ob = S3Store(bucket, prefix=prefix, config={"endpoint": endpoint_url, "region": "us-east-1",
                                        "access_key_id": "k", "secret_access_key": "s",
                                        "virtual_hosted_style_request": False},
                 client_options={"allow_http": "true", "pool_max_idle_per_host": "64"})
    readers = {
        "s3fs, 16 threads": (16, lambda sp: len(fs.cat_file(f"{bucket}/{prefix}/{sp[0]}", start=sp[1], end=sp[2]))),
        "obstore, 16 threads": (16, lambda sp: len(obstore.get_range(ob, sp[0], start=sp[1], end=sp[2]))),
        "obstore, 32 threads": (32, lambda sp: len(obstore.get_range(ob, sp[0], start=sp[1], end=sp[2]))),
    }
    rates = {}
    for label, (threads, read) in readers.items():
        start, cpu, served = time.perf_counter(), _cpu(), tree_cpu(server)
        with cf.ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(read, spans))
        assert got == total, (label, got, total)
        rates[label] = (total / (time.perf_counter() - start) / 1e6, (_cpu() - cpu) / (total / 1e9),
                        (tree_cpu(server) - served) / (total / 1e9))
    return rates


def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its children that have exited (the loader's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# Threads of a DataLoader worker by their OS name (stoker names its own): what each does for a remote read.
_ROLES = {"stoker-prefetch": "filling the cache (download loop, writes)", "stoker-read": "calls into the client",
          "tokio-rt-worker": "obstore's runtime (HTTP)"}


class WorkerThreads:
    """CPU seconds of the loader's worker processes by thread role, sampled every `interval` seconds from /proc
    (a thread's last `interval` before its worker exits is not seen), and `main`: this process's over the epoch."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.seen = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerThreads:
        self.main = time.process_time()  # this process: the training loop (and this sampler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.main = time.process_time() - self.main

    def roles(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for comm, cpu in self.seen.values():
            role = next((r for prefix, r in _ROLES.items() if comm.startswith(prefix)),
                        "reading, checking, handing over (the rest)")
            totals[role] = totals.get(role, 0.0) + cpu
        return totals

    def _run(self) -> None:
        ticks, me = os.sysconf("SC_CLK_TCK"), os.getpid()
        workers: list[int] = []
        while not self._stop.wait(self.interval):
            if not workers:  # torch names its worker processes; found once they have started
                workers = [int(p) for p in os.listdir("/proc")
                           if p.isdigit() and _parent(int(p)) == me and _comm(int(p)) == "pt_data_worker"]
            for pid in workers:
                try:
                    tasks = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tasks:
                    try:
                        with open(f"/proc/{pid}/task/{tid}/stat") as f:
                            stat = f.read()
                    except OSError:
                        continue
                    fields = stat.rsplit(")", 1)[1].split()
                    comm = stat[stat.index("(") + 1:stat.rindex(")")]
                    self.seen[(pid, tid)] = (comm, (int(fields[11]) + int(fields[12])) / ticks)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def raw_epoch(source: str, workers: int, threads: WorkerThreads | None = None,
              **kwargs) -> tuple[float, float, int, float]:
    """(MB/s of sample bytes, seconds to the first batch, bytes, CPU seconds per GB) of one epoch of raw samples,
    timed from iter(); the CPU time counts this process and the workers (they exit at the end of the epoch).
    `threads`, if given, samples the workers' threads during the epoch."""
    import stoker

    loader = stoker.DataLoader(stoker.StreamingDataset(source, seed=0, **kwargs), batch_size=64, num_workers=workers,
                               prefetch_factor=4)
    start, first, nbytes, cpu = time.perf_counter(), None, 0, _cpu()
    with threads or contextlib.nullcontext():
        for batch in loader:
            first = time.perf_counter() - start if first is None else first
            nbytes += sum(len(image) for image in batch["image"])
        seconds = time.perf_counter() - start
        del loader, batch  # its workers exit and are waited for, so their CPU time is counted
    return nbytes / seconds / 1e6, first or 0.0, nbytes, (_cpu() - cpu) / (nbytes / 1e9)


def first_batch(source: str, workers: int, **kwargs) -> float:
    """Seconds from iter() to the first raw batch."""
    import stoker

    loader = stoker.DataLoader(stoker.StreamingDataset(source, seed=0, **kwargs), batch_size=64, num_workers=workers,
                               prefetch_factor=4)
    start = time.perf_counter()
    batches = iter(loader)  # held: a dropped iterator shuts its workers down before the clock is read
    next(batches)
    seconds = time.perf_counter() - start
    del batches, loader
    return seconds


_FRESH = r"""
import json, sys, time
start = time.perf_counter()
import stoker
source, options, cache, window = json.loads(sys.argv[1])
loader = stoker.DataLoader(stoker.StreamingDataset(source, seed=0, storage_options=options, cache_dir=cache,
                                                   shuffle_buffer=window), batch_size=64, num_workers=2)
opened = time.perf_counter() - start
batches = iter(loader)
next(batches)
print(json.dumps([opened, time.perf_counter() - start]))
"""


def fresh_first_batch(source: str, window: int, storage_options: dict | None = None,
                      cache_dir: str | None = None) -> tuple[float, float]:
    """(seconds to open the dataset, seconds to the first raw batch) in a fresh interpreter, from its first line:
    what a training script pays on start-up, imports and the manifest's read included."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FRESH, json.dumps([source, storage_options, cache_dir, window])],
                          capture_output=True, text=True, check=True)
    opened, first = json.loads(done.stdout.strip().splitlines()[-1])
    return opened, first


def pipeline_epoch(source: str, workers: int, **kwargs) -> tuple[float, float, int, float]:
    """(images/s, seconds to the first batch, images, CPU seconds) of one epoch decoded and augmented by stoker's
    PIL transform; the CPU time counts this process and the workers."""
    import stoker

    collate = stoker.build_transform(stoker.TransformSpec(size=SIZE), backend="pil", seed=0)
    loader = stoker.DataLoader(stoker.StreamingDataset(source, seed=0, **kwargs), batch_size=64, num_workers=workers,
                               collate_fn=collate, prefetch_factor=4)
    start, first, count, cpu = time.perf_counter(), None, 0, _cpu()
    for batch in loader:
        first = time.perf_counter() - start if first is None else first
        count += len(batch["label"])
    seconds = time.perf_counter() - start
    del loader, batch  # its workers exit and are waited for, so their CPU time is counted
    return count / seconds, first or 0.0, count, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=880, help="JPEGs per class (10 classes; 880: ~420 MB)")
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--latencies", type=float, nargs="+", default=[5, 20, 80], help="first-byte delays, ms")
    parser.add_argument("--pipeline-latencies", type=float, nargs="*", default=[20, 80])
    parser.add_argument("--rate-mb", type=float, default=100, help="MB/s per connection")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small-window", type=int, default=512,
                        help="a shuffle_buffer (samples) for a second first-batch figure")
    args = parser.parse_args()

    import stoker
    from stoker.testing import ObjectStore

    packed = _data.packed(_data.image_tree(per_class=args.per_class), args.shard_mb, "remote")
    manifest = stoker.Manifest.load(str(packed))
    shards = [(s.name, s.bytes) for s in manifest.shards]
    total = sum(size for _, size in shards)
    print(f"dataset: {len(shards)} shards, {total / 1e6:.0f} MB of packed JPEGs ({sum(s.rows for s in manifest.shards)} "
          f"images); store: nginx, {args.rate_mb:g} MB/s per connection; {args.workers} workers; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    raw_epoch(str(packed), args.workers)  # pages the shards into the page cache: "local" is the best case
    local_rate, local_first, local_bytes, local_cpu = raw_epoch(str(packed), args.workers)
    window = stoker.StreamingDataset(str(packed)).shuffle_buffer
    rows = sum(s.rows for s in manifest.shards)
    print(f"local disk (page cache): {local_rate:,.0f} MB/s ({local_cpu:.1f} CPU-s/GB), first batch "
          f"{local_first:.2f} s; the default shuffle window holds {min(window, rows)} of the {rows} samples, so a "
          "first batch draws from nearly every shard", flush=True)
    local_small = first_batch(str(packed), args.workers, shuffle_buffer=args.small_window)
    local_fresh = fresh_first_batch(str(packed), args.small_window)
    lines = []
    client_parts: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="stoker-remote-") as tmp:
        disk_kind = filesystem_type(tmp)
        for latency in args.latencies:
            with ObjectStore(packed.parent, bucket="data", latency=latency / 1000, rate=args.rate_mb * 1e6) as store:
                store_url = store.url("s3", packed.name)
                with mp.get_context("spawn").Pool(1) as pool:
                    rates = pool.apply(client_rates, (store.endpoint_url, store.bucket, packed.name, shards,
                                                      store.process.pid))
                cache = os.path.join(tmp, f"cache-{latency:g}")
                served, threads = tree_cpu(store.process.pid), WorkerThreads()
                kernel = kernel_threads_cpu()
                rate, first, nbytes, cpu = raw_epoch(store_url, args.workers, threads,
                                                     storage_options=store.storage_options(), cache_dir=cache)
                os.sync()  # the cache's dirty pages written back now, by whoever writes them, inside the count
                kernel_cpu = kernel_since(kernel) / (nbytes / 1e9)
                server_cpu = (tree_cpu(store.process.pid) - served) / (nbytes / 1e9)
                assert nbytes == local_bytes, (nbytes, local_bytes)
                shutil.rmtree(cache)
                write_cpu = cache_write_cpu(tmp)
                tmpfs = ""
                if os.path.isdir("/dev/shm"):
                    # The same with the cache in RAM: what the download path does apart from this disk's writes.
                    cache = tempfile.mkdtemp(prefix="stoker-remote-", dir="/dev/shm")
                    kernel = kernel_threads_cpu()
                    try:
                        shm_rate, _, shm_bytes, shm_cpu = raw_epoch(store_url, args.workers, cache_dir=cache,
                                                                    storage_options=store.storage_options())
                        os.sync()
                        shm_kernel = kernel_since(kernel) / (shm_bytes / 1e9)
                    finally:
                        shutil.rmtree(cache)
                    tmpfs = (f"; cache on tmpfs (/dev/shm) {shm_rate:,.0f} MB/s ({shm_cpu:.1f} CPU-s/GB, kernel threads "
                             f"{shm_kernel:.2f})")
                cache = os.path.join(tmp, f"small-{latency:g}")
                small = first_batch(store_url, args.workers, storage_options=store.storage_options(), cache_dir=cache,
                                    shuffle_buffer=args.small_window)
                shutil.rmtree(cache)
                fresh = fresh_first_batch(store_url, args.small_window, store.storage_options(), cache)
                shutil.rmtree(cache)
            best_label, (best, best_cpu, best_server) = max(rates.items(), key=lambda item: item[1][0])
            print(f"{latency:g} ms: " + ", ".join(f"{label} {value:,.0f} MB/s ({c:.1f} CPU-s/GB, nginx {n:.2f})"
                                                   for label, (value, c, n) in rates.items())
                  + f"; stoker cold cache on {disk_kind} {rate:,.0f} MB/s ({cpu:.1f} CPU-s/GB, nginx {server_cpu:.2f}, "
                  f"kernel threads incl. writeback {kernel_cpu:.2f}), first batch {first:.2f} s{tmpfs}; "
                  f"machine load {os.getloadavg()[0]:.1f}", flush=True)
            cores = os.cpu_count() or 1
            client_parts[latency] = best_cpu + best_server  # CPU-s/GB any remote read adds, cache or not
            budget = best_cpu + best_server + write_cpu + local_cpu
            possible = cores / budget * 1e3  # MB/s with every core busy on exactly this work
            per_gb = nbytes / 1e9
            print(f"where stoker's CPU went at {latency:g} ms (CPU-s/GB; workers' threads sampled every "
                  f"{threads.interval:g} s): " + ", ".join(f"{role} {seconds / per_gb:.2f}"
                                                          for role, seconds in threads.roles().items())
                  + f"; training process (with this sampler) {threads.main / per_gb:.2f}; not seen by the sampler "
                  f"(worker start-up, each thread's last {threads.interval:g} s) "
                  f"{cpu - (sum(threads.roles().values()) + threads.main) / per_gb:.2f}", flush=True)
            print(f"CPU budget at {latency:g} ms on {cores} CPUs: best client ({best_label}) {best_cpu:.2f} + nginx "
                  f"{best_server:.2f} + writing the cache {write_cpu:.2f} + stoker's loader on local data "
                  f"{local_cpu:.2f} = {budget:.2f} CPU-s/GB -> at most {possible:,.0f} MB/s, best ratio possible "
                  f"{min(1.0, possible / best):.2f}x; stoker used {cpu:.2f} + nginx {server_cpu:.2f} = "
                  f"{cpu + server_cpu:.2f} CPU-s/GB" + (" (stoker beat this budget: no bound from this run)"
                                                         if rate > possible else ""), flush=True)
            lines.append(f"ratio raw bytes store/best plain client ({best_label}) at {latency:g} ms: "
                         f"{rate / best:.2f}x" + (f" (goal >= 0.8x; {_bound(rate, possible, best, cores, write_cpu)})"
                                                   if latency == 20 else ""))
            lines.append(f"ratio raw bytes store/local at {latency:g} ms: {rate / local_rate:.2f}x")
            lines.append(f"first batch cold store minus local at {latency:g} ms: {first - local_first:.2f} s"
                         + (" (goal <= 0.5 s)" if latency == 20 else ""))
            lines.append(f"first batch cold store minus local at {latency:g} ms with shuffle_buffer="
                         f"{args.small_window}: {small - local_small:.2f} s ({small:.2f} vs {local_small:.2f} s)")
            lines.append(f"first batch from a fresh process (imports, manifest, workers) with shuffle_buffer="
                         f"{args.small_window} at {latency:g} ms, cold store minus local: {fresh[1] - local_fresh[1]:.2f} s "
                         f"({fresh[1]:.2f} vs {local_fresh[1]:.2f} s; the dataset opened in {fresh[0]:.2f} vs "
                         f"{local_fresh[0]:.2f} s)")
        if args.pipeline_latencies:
            local_ips, local_pfirst, local_count, local_pcpu = pipeline_epoch(str(packed), args.workers)
            print(f"image pipeline, local disk: {local_ips:,.0f} img/s, first batch {local_pfirst:.2f} s, "
                  f"{local_pcpu / local_count * 1e3:.2f} CPU-ms per image", flush=True)
        for latency in args.pipeline_latencies:
            with ObjectStore(packed.parent, bucket="data", latency=latency / 1000, rate=args.rate_mb * 1e6) as store:
                for where in (tmp, "/dev/shm"):
                    if where != tmp and not os.path.isdir(where):
                        continue
                    cache = tempfile.mkdtemp(prefix="stoker-pipeline-", dir=where)
                    try:
                        ips, pfirst, count, pcpu = pipeline_epoch(store.url("s3", packed.name), args.workers,
                                                                  storage_options=store.storage_options(),
                                                                  cache_dir=cache)
                        # Writing into this cache directory at its cheapest, right after: the bound's share for it.
                        write_cpu = cache_write_cpu(cache) if latency in client_parts else None
                    finally:
                        shutil.rmtree(cache)
                    assert count == local_count
                    label = f"cache on {filesystem_type(where)}"
                    print(f"image pipeline, store at {latency:g} ms, cold {label}: {ips:,.0f} img/s, first batch "
                          f"{pfirst:.2f} s, {pcpu / count * 1e3:.2f} CPU-ms per image", flush=True)
                    bound = ""
                    if write_cpu is not None:
                        bound = "; " + pipeline_bound(ips, local_ips, local_pcpu / local_count, client_parts[latency],
                                                      write_cpu, total / 1e9 / local_count, latency)
                    lines.append(f"ratio image pipeline store ({label})/local at {latency:g} ms: "
                                 f"{ips / local_ips:.2f}x (goal >= 0.95x{bound})")
    print(f"machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
