"""How much does stoker.monitor cost a training loop?

Two measurements:
  * A/B: a small CPU training step (an MLP, forward + backward + SGD, ~5-20 ms) over an in-memory loader, run with
    and without the monitor in interleaved pairs of runs; the median over pairs of the ratio of median step times is
    the overhead.
    Honest but noisy on a shared machine: the step's own jitter is larger than the effect being measured.
  * Own cost: the monitor wrapped around a loader that does nothing (but reports stage clocks, which the monitor
    reads at each pass start, at the end of start-up and at each log line; and worker starts, read every step),
    many steps, minus the same bare loop. This
    is what the monitor adds to every step, in microseconds, with almost no noise; divided by the step time it
    gives the overhead fraction the A/B measurement cannot resolve.

Usage: python benchmarks/monitor_overhead.py [--steps 50] [--pairs 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stoker.perf.monitor import monitor


def _discard(line: str) -> None:
    """Log target that drops lines, so formatting costs are measured but the terminal stays quiet."""


def make_step(batch: int, width: int):
    """Return a training step function over (x, y) batches and a list of 16 such batches."""
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(data: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = data
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    batches = [(torch.randn(batch, width), torch.randint(0, 10, (batch,))) for _ in range(16)]
    return step, batches


def step_times(loader, step) -> list[float]:
    """Wall seconds of each iteration (fetch + step), timed from outside so both arms pay the same timer."""
    times = []
    last = time.perf_counter()
    for data in loader:
        step(data)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


class _Clocked(list):
    """A list that also reports stage clocks and worker starts, as stoker's DataLoader does, so the monitor reads
    them too (the worker starts at every step)."""

    worker_starts = property(lambda self: 1)
    workers_first_batch = property(lambda self: 0)

    def stage_times(self) -> dict[str, float]:
        return {"read": 1.0, "transform": 2.0, "collate": 0.5, "handoff": 0.1}


def own_cost_us(steps: int, repeats: int) -> float:
    """Median extra microseconds per step that the monitor adds around a loader that does nothing."""
    items = _Clocked([torch.zeros(32, 4)] * steps)
    costs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _item in items:
            pass
        bare = time.perf_counter() - start
        start = time.perf_counter()
        for _item in monitor(items, log=_discard):
            pass
        wrapped = time.perf_counter() - start
        costs.append((wrapped - bare) / steps * 1e6)
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=20, help="interleaved with/without pairs of runs")
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one thread: steadier timings on a shared machine
    torch.manual_seed(0)
    step, batches = make_step(args.batch, args.width)
    loader = [batches[i % len(batches)] for i in range(args.steps)]
    step_times(loader[:20], step)  # warm up the allocator and kernels

    plain: list[float] = []
    ratios: list[float] = []
    for pair in range(args.pairs):
        # Alternate which arm goes first so slow drift (thermal, other jobs) does not favour one side.
        times = {}
        for with_monitor in ((False, True) if pair % 2 == 0 else (True, False)):
            wrapped = monitor(loader, log=_discard) if with_monitor else loader
            # Median step of the run: a step hit by another job's burst is an outlier, not a cost of the monitor.
            times[with_monitor] = statistics.median(step_times(wrapped, step))
        plain.append(times[False])
        ratios.append(times[True] / times[False] - 1)  # both runs of a pair saw about the same machine load
    step_s = statistics.median(plain)
    ab = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    cost_us = own_cost_us(steps=200_000, repeats=5)

    print(f"step: {step_s * 1e3:.2f} ms median (MLP {args.width}->{2 * args.width}->10, batch {args.batch}, "
          f"1 thread; {args.pairs} interleaved pairs of {args.steps}-step runs)")
    print(f"A/B: median over pairs of (median step with monitor / without) - 1 = {ab:+.2%}; "
          f"quartiles {q1:+.2%} .. {q3:+.2%} (that spread is the machine's noise)")
    print(f"monitor's own cost: {cost_us:.2f} us/step (median of 5 runs of 200,000 no-op steps)")
    print(f"overhead: {cost_us * 1e-6 / step_s:.3%} of a {step_s * 1e3:.2f} ms step from its own cost; "
          f"A/B {ab:+.2%}; goal <= 1%")


if __name__ == "__main__":
    main()
