"""What checking every sample's checksum costs: the same loaders with checking on (the default) and off.

    .venv/bin/python benchmarks/integrity.py [--mb 512] [--images 512] [--workers 2] [--rounds 3] [--epochs 4]

  (1) raw bytes: image-sized random samples streamed from local Arrow shards by stoker.DataLoader (as in
      stream_local.py), MB/s and CPU seconds per GB of the training loop and of the workers, twice: (1a) the training
      loop reads every byte once (a numpy pass, what any consumer of the bytes does at least) and (1b) it only counts
      them. Unchecked, (1b) never touches the bytes at all (workers hand out views of the mapped file), so there the
      check, which must read every byte once in a worker, is the only pass over them: it roughly doubles CPU per GB.
      For (1a), the training loop's thread per GB: running, waiting on a run queue for a core (Linux schedstat),
      waiting for batches. A round is `--epochs` epochs (in (2) too): process CPU clocks tick every 10 ms, which is
      0.02 CPU-s/GB of one 512 MB epoch.
  (2) image pipeline: JPEGs packed with pack_dataset, StreamingDataset, stoker.DataLoader with the pil backend
      decoding and cropping to 224x224 (as in decode.py), img/s
  (3) the check alone, in one process: GB/s and CPU seconds per GB of digesting rows in record-batch order, CPU
      seconds per GB of digesting them 64 shuffled rows at a time (what workers spend per byte), next to one XXH3 call
      per record batch (the floor: every byte read once from memory) and the loop's own read pass of (1a) (a numpy
      sum)
Rounds are interleaved (checked, unchecked, checked, ...) and each figure keeps its best round, so both see the
same machine load. Prints the ratios checked/unchecked on the last lines (goals: >= 0.97 images, >= 0.95 raw bytes
read by the loop), what the check added to the workers' and the loop's CPU per GB, and the best ratio (1a) that
the CPU per GB of the checked rounds allows: the training loop is one thread, so it cannot go faster than one core
over its CPU per GB, and all processes share the cores, so not faster than cores over their sum either. The
unchecked loader is bound by its training loop alone (its workers only plan rows); checked, the workers read every
byte too, and any time the loop waits for a core that a worker holds is lost.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np


import stoker
from stoker.dataloader.reader import ReadOptions
from stoker.formats import integrity
from stoker.formats.arrays import column_view
from stoker.formats.shard import open_shard
from stoker.options import cpu_cores

from stream_local import cpu_seconds, make_bench_dataset, read_all, time_cat


def raw_loader(root: str, checksums: bool, workers: int) -> stoker.DataLoader:
    ds = stoker.StreamingDataset(root, seed=0, read=ReadOptions(checksums=checksums))
    return stoker.DataLoader(ds, batch_size=64, num_workers=workers, persistent_workers=True, prefetch_factor=4)


class Spent(NamedTuple):
    """What epochs of the raw loader took: wall seconds, sample bytes, and seconds of CPU of the training loop's process
    and of its thread, of the loader's workers, and of the thread waiting on a run queue for a core."""

    seconds: float = 0.0
    nbytes: int = 0
    process: float = 0.0
    thread: float = 0.0
    workers: float = 0.0
    queued: float = 0.0

    def __add__(self, other: Any) -> Spent:  # type: ignore[override]
        return Spent(*(a + b for a, b in zip(self, other)))


def raw_epoch(loader: stoker.DataLoader, read: bool) -> Spent:
    """What one epoch took (see Spent)."""
    import psutil

    pids = [p.pid for p in psutil.Process().children() if p.name() != "cat"]
    process, workers = split_cpu(pids)
    thread, queued = time.thread_time(), run_queue_seconds()
    start, nbytes = time.perf_counter(), 0
    for batch in loader:
        nbytes += sum(len(image) for image in batch["image"])
        if read:
            read_all(batch["image"])
    seconds = time.perf_counter() - start
    process_end, workers_end = split_cpu(pids)
    return Spent(seconds, nbytes, process_end - process, time.thread_time() - thread, workers_end - workers,
                 run_queue_seconds() - queued)


def run_queue_seconds() -> float:
    """Seconds this thread has waited on a run queue for a core (Linux schedstat; 0 where there is none)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def split_cpu(pids: list[int]) -> tuple[float, float]:
    """CPU seconds so far of this process (the training loop) and of the live `pids` (the loader's workers)."""
    own = cpu_seconds([])
    return own, cpu_seconds(pids) - own


def image_epochs(loader: stoker.DataLoader, epochs: int = 1) -> float:
    """Images per second of `epochs` epochs."""
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            count += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch["image"])
    return count / (time.perf_counter() - start)


def check_alone(paths: list[str]) -> tuple[float, float, float, float, float]:
    """In one process, pages already mapped: (GB/s, CPU-s/GB) of digesting every row of the shards in record-batch
    order, CPU-s/GB of digesting them 64 shuffled rows at a time (as a worker gathers them), and CPU-s/GB of one
    XXH3 call per record batch's image bytes and of the loop's read pass over them."""
    import xxhash

    batches = [b for p in paths for b in open_shard(p, checksums=False).iter_batches()]
    images = [b.column("image") for b in batches]
    rows = [[image[i].as_buffer() for i in range(len(image))] for image in images]
    nbytes = sum(b.nbytes for b in batches) / 1e9
    image_bytes = sum(len(r) for rs in rows for r in rs) / 1e9

    def best(work: Any) -> tuple[float, float]:
        wall = cpu = float("inf")
        for _ in range(5):
            start, used = time.perf_counter(), time.process_time()
            work()
            wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - used)
        return wall, cpu

    wall, cpu = best(lambda: [integrity.check_batch("bench", b, np.arange(b.num_rows)) for b in batches])
    _, shuffled = best(shuffled_checks(batches))
    _, floor = best(lambda: [xxhash.xxh3_64_intdigest(memoryview(i.buffers()[2])) for i in images])
    _, loop = best(lambda: [read_all(r) for r in rows])
    return nbytes / wall, cpu / nbytes, shuffled / nbytes, floor / image_bytes, loop / image_bytes


def shuffled_checks(batches: list[Any]) -> Any:
    """A function that checks every row of `batches` 64 at a time in a shuffled order, each column one table over
    all record batches (as a worker's catalog holds the open shards), and fails if any row does not match."""
    tables: dict[str, Any] = {}
    for field in batches[0].schema:
        views = [column_view(b.column(field.name)) for b in batches]
        if isinstance(views[0], tuple):
            tables[field.name] = ([values for _, values in views],
                                  np.repeat(np.arange(len(views), dtype=np.int32), [len(o) - 1 for o, _ in views]),
                                  np.concatenate([o[:-1] for o, _ in views]), np.concatenate([np.diff(o) for o, _ in views]))
        else:
            tables[field.name] = np.concatenate(views)
    stored = tables.pop(integrity.COLUMN)
    order = np.random.default_rng(0).permutation(len(stored))

    def check() -> None:
        for at in range(0, len(order), 64):
            index = order[at:at + 64]
            checked = integrity.Rows(len(index))
            for table in tables.values():
                if isinstance(table, tuple):
                    checked.add_variable(table[0], table[1][index], table[2][index], table[3][index])
                else:
                    checked.add_fixed(table[index])
            assert not len(integrity.mismatches(checked, stored[index])), "the benchmark's shards do not check"

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="raw dataset size in MB")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per round (CPU clocks tick every 10 ms)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        paths = make_bench_dataset(raw, args.mb)
        time_cat(paths)  # page cache warm
        speed, check_cpu, shuffled_cpu, floor_cpu, loop_cpu = check_alone(paths)
        print(f"(3) checking alone, one process: {speed:.1f} GB/s of sample bytes, {check_cpu:.3f} CPU-s/GB; 64 "
              f"shuffled rows at a time, as workers do, {shuffled_cpu:.3f} CPU-s/GB; one XXH3 call per record batch "
              f"{floor_cpu:.3f} CPU-s/GB; the loop's read pass {loop_cpu:.3f} CPU-s/GB")
        loaders = {on: raw_loader(raw, on, args.workers) for on in (True, False)}
        for loader in loaders.values():
            raw_epoch(loader, False)  # workers started
        rates: dict[tuple[bool, bool], list[float]] = {}
        spent: dict[tuple[bool, bool], list[Spent]] = {}  # per round, per GB
        for _ in range(args.rounds):
            for read in (True, False):
                for on, loader in loaders.items():
                    took = sum((raw_epoch(loader, read) for _ in range(args.epochs)), Spent())
                    gb = took.nbytes / 1e9
                    rates.setdefault((read, on), []).append(gb / took.seconds * 1e3)
                    spent.setdefault((read, on), []).append(Spent(*(x / gb for x in took)))
        for read, on in rates:
            print(f"(1{'a' if read else 'b'}) raw bytes, {'loop reads every byte' if read else 'loop counts bytes  '}, "
                  f"{args.workers} workers, checksums {'on ' if on else 'off'}: "
                  + ", ".join(f"{r:6.0f}" for r in rates[read, on]) + " MB/s; "
                  + ", ".join(f"{x.process + x.workers:.3f} ({x.process:.3f} + {x.workers:.3f})" for x in spent[read, on])
                  + " CPU-s/GB (training loop + workers)")
        for on in (True, False):
            best = spent[True, on][int(np.argmax(rates[True, on]))]
            print(f"(1a) checksums {'on ' if on else 'off'}, the training loop's thread per GB in its best round: ran "
                  f"{best.thread:.3f} s, waited for a core {best.queued:.3f} s, waited for batches "
                  f"{best.seconds - best.thread - best.queued:.3f} s")
        del loaders

        from stoker.synthetic import make_image_tree

        tree = make_image_tree(os.path.join(tmp, "tree"), num_classes=8, per_class=max(1, args.images // 8),
                               min_side=420, max_side=480)
        shards = os.path.join(tmp, "shards")
        stoker.pack_dataset(str(tree), shards, progress=False)
        spec = stoker.TransformSpec(size=224, mode="train", dtype="uint8")
        images = {}
        for on in (True, False):
            ds = stoker.StreamingDataset(shards, seed=0, read=ReadOptions(checksums=on))
            images[on] = stoker.DataLoader(ds, batch_size=64, num_workers=args.workers, persistent_workers=True,
                                           prefetch_factor=4,
                                           collate_fn=stoker.build_transform(spec, backend="pil", seed=0))
            image_epochs(images[on])
        img_rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for on, loader in images.items():
                img_rates[on].append(image_epochs(loader, args.epochs))
        for on in (True, False):
            print(f"(2) image pipeline, {args.workers} workers, checksums {'on ' if on else 'off'}: "
                  + ", ".join(f"{r:6.0f}" for r in img_rates[on]) + " img/s")
    load = os.getloadavg()[0]
    print(f"machine load average: {load:.1f} on {os.cpu_count()} CPUs")
    for read in (False, True):
        ratio = max(rates[read, True]) / max(rates[read, False])
        total = {on: min(x.process + x.workers for x in spent[read, on]) for on in (True, False)}
        print(f"ratio raw bytes ({'1a, loop reads every byte' if read else '1b, bytes never touched'}) checked/unchecked: "
              f"{ratio:.3f}{' (goal >= 0.95)' if read else ''}; CPU per GB "
              + (f"{total[True] / total[False]:.2f}x" if total[False] else
                 "below the CPU clock's resolution (use a larger --mb or --epochs)"))
    # The bound: the training loop is one thread (at most one core), and all processes share the cores, so checked
    # throughput is at most min(1 / thread, cores / (process + workers)) with the least CPU per GB of any checked round.
    on, off = ({f: min(getattr(x, f) for x in spent[True, c]) for f in Spent._fields} for c in (True, False))
    cores = cpu_cores()
    bound = min(1 / on["thread"], cores / (on["process"] + on["workers"])) * 1e3
    print(f"(1a) the check added {on['workers'] - off['workers']:+.3f} CPU-s/GB in the workers and "
          f"{on['process'] - off['process']:+.3f} in the training loop (least per round; checking alone: {shuffled_cpu:.3f} shuffled, {check_cpu:.3f} in order)")
    print(f"best ratio (1a) possible with the CPU per GB this run spent checked: min(1 / {on['thread']:.3f} (the loop's "
          f"thread, one core), {cores} cores / ({on['process']:.3f} + {on['workers']:.3f})) = {bound:.0f} MB/s, against "
          f"unchecked {max(rates[True, False]):.0f} MB/s: {bound / max(rates[True, False]):.3f}")
    print(f"ratio image pipeline checked/unchecked: {max(img_rates[True]) / max(img_rates[False]):.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()
