"""num_workers="auto" vs a grid of fixed settings, on two pipelines whose input is the bottleneck.

Data: ~400 px JPEG shards (benchmarks/_data.py), batch 32, stoker's Pillow transform (decode, random-resized crop
to 224, flip, jitter) as the collate function, and a training loop that sleeps a fixed step per batch.

- `decode`: the transform alone; the step is half the time one core needs to decode a batch (measured here
  first), so torch's default (num_workers=0) starves and the machine's cores are the limit.
- `decode+io`: the same plus `--io-ms` of waiting per batch in the worker (a network filesystem, a remote feature
  store); the step is a quarter of a batch's decode time. Workers that wait use no CPU, so more workers than
  cores pay.

For each: a grid of num_workers in {0..4} x prefetch in {2, 4, 8}, one short run each (`--grid-epochs`), finds
the best fixed setting. The best of 13 noisy runs is the luckiest, so the finalists (autotuned, the grid's best,
and the common num_workers=2/prefetch 2) are then measured again, interleaved, `--rounds` times over
`--epochs` epochs (persistent workers, timed from the first iter(), start-up and tuning included); the ratios
compare the medians of those rounds, and the convergence time (first change) is printed. Ratios come last.

    .venv/bin/python benchmarks/autotune.py [--per-class 100] [--epochs 8] [--rounds 3] [--only decode]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path


import torch

import _data
import stoker

BATCH = 32
GRID = [(0, None)] + [(w, p) for w in range(1, 5) for p in (2, 4, 8)]


def packed(per_class: int) -> Path:
    return _data.packed(_data.image_tree(per_class=per_class, num_classes=10, side=(300, 500)), 16, "autotune")


class Collate:
    """The Pillow transform, then `io_s` of waiting (picklable, for spawn too)."""

    def __init__(self, io_s: float) -> None:
        self.io_s = io_s
        self.transform = stoker.build_transform(stoker.TransformSpec(size=224, mode="train"), backend="pil", seed=0)

    def __call__(self, samples):
        batch = self.transform(samples)
        if self.io_s:
            time.sleep(self.io_s)
        return batch


def decode_seconds_per_batch(root: Path) -> float:
    """One core's time to decode and augment one batch (median of a few), in this process."""
    samples = []
    for sample in stoker.StreamingDataset(str(root), seed=1):
        samples.append(sample)
        if len(samples) == BATCH * 4:
            break
    fn, times = Collate(0.0), []
    for i in range(4):
        start = time.perf_counter()
        fn(samples[i * BATCH:(i + 1) * BATCH])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(root: Path, step: float, io_s: float, workers, prefetch, epochs: int) -> tuple[float, float, object]:
    """Images/s over `epochs` epochs with a loop that sleeps `step` per batch, and over the epochs after the first
    (where the tuner has settled); returns (rate, steady rate, loader)."""
    ds = stoker.StreamingDataset(str(root), seed=0)
    loader = stoker.DataLoader(ds, batch_size=BATCH, num_workers=workers, prefetch_factor=prefetch,
                               collate_fn=Collate(io_s), persistent_workers=workers != 0)
    images, start = 0, time.perf_counter()
    first = (0, start)
    for epoch in range(epochs):
        for batch in loader:
            images += len(batch["label"])
            time.sleep(step)
        if epoch == 0:
            first = (images, time.perf_counter())
    end = time.perf_counter()
    steady = (images - first[0]) / (end - first[1]) if epochs > 1 else float("nan")
    return images / (end - start), steady, loader


def workload(name: str, root: Path, step: float, io_s: float, args: argparse.Namespace) -> list[str]:
    print(f"== {name}: step {step * 1e3:.0f} ms, I/O wait {io_s * 1e3:.0f} ms per batch", flush=True)
    grid = {}
    for workers, prefetch in GRID:
        grid[(workers, prefetch)], _, _ = run(root, step, io_s, workers, prefetch, args.grid_epochs)
        print(f"grid  num_workers={workers} prefetch_factor={prefetch}: {grid[(workers, prefetch)]:7.1f} img/s",
              flush=True)
    best = max(grid, key=grid.get)
    finalists = {"autotuned": ("auto", "auto"), "best fixed": best, "num_workers=2 prefetch 2": (2, 2)}
    rounds: dict[str, list[float]] = {name: [] for name in finalists}
    steady: dict[str, list[float]] = {name: [] for name in finalists}
    first_change = []
    report = None
    for r in range(args.rounds):
        for final, (workers, prefetch) in finalists.items():
            rate, settled, loader = run(root, step, io_s, workers, prefetch, args.epochs)
            rounds[final].append(rate)
            steady[final].append(settled)
            if final == "autotuned":
                report = loader.tuning_report()
                first_change.append(report.history[0].seconds if report.history else float("nan"))
            print(f"round {r + 1} {final:26s} {rate:7.1f} img/s", flush=True)
    print(report)
    med = {final: statistics.median(rates) for final, rates in rounds.items()}
    settled = {final: statistics.median(rates) for final, rates in steady.items()}
    print(f"after the first epoch (the tuner settled): autotuned/best-fixed "
          f"{settled['autotuned'] / settled['best fixed']:.2f}x; the first epoch costs the tuning")
    print(f"best fixed on the grid: num_workers={best[0]} prefetch_factor={best[1]}; medians over {args.rounds} "
          f"rounds of {args.epochs} epochs: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) +
          f" img/s; first change after {statistics.median(first_change):.1f} s")
    return [
        f"ratio {name} autotuned/best-fixed: {med['autotuned'] / med['best fixed']:.2f}x (goal >= 0.95)",
        f"ratio {name} autotuned/torch-default(num_workers=0): {med['autotuned'] / grid[(0, None)]:.2f}x (goal > 1)",
        f"ratio {name} autotuned/(num_workers=2, prefetch 2): {med['autotuned'] / med['num_workers=2 prefetch 2']:.2f}x"
        " (goal > 1)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="images per class (10 classes)")
    parser.add_argument("--grid-epochs", type=int, default=2, help="epochs per grid run")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run of the finalists")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of the finalists")
    parser.add_argument("--io-ms", type=float, default=60.0, help="I/O wait per batch of the decode+io workload")
    parser.add_argument("--only", choices=("decode", "decode+io"), default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    torch.set_num_threads(1)
    root = packed(args.per_class)
    per_batch = decode_seconds_per_batch(root)
    print(f"dataset: {root}; batch {BATCH}; one core decodes a batch in {per_batch * 1e3:.0f} ms")
    ratios = []
    if args.only in (None, "decode"):
        ratios += workload("decode", root, per_batch / 2, 0.0, args)
    if args.only in (None, "decode+io"):
        ratios += workload("decode+io", root, per_batch / 4, args.io_ms / 1e3, args)
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
