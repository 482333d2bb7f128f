"""The autotuner's model as pure functions: what the measurements say (`estimate`) and what to do (`propose`).

    p  worker wall time per batch (one worker), s  worker CPU time per batch, c  consumer step time
    rate with n workers  = min(n / p, free cores / s)         need  n = ceil(headroom * p / c)

`autotune.Tuner` gathers the measurements (clocks, /proc), calls these, and keeps the bookkeeping between
decisions; everything here is arithmetic on its arguments, so it is tested table by table (tests/test_tuning.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CPU_USABLE = 0.9  # share of the free cores the workers can use in practice
SATURATED = 0.85  # workers busy, or cores used, above this fraction: production is at its limit


@dataclass(frozen=True)
class Setting:
    workers: int
    prefetch: int


@dataclass(frozen=True)
class Observed:
    """One decision window's measurements; the workers' figures cover the whole segment (bundles arrive in lumps,
    so shorter windows alias)."""

    workers: int  # n, the workers running
    steps: tuple[float, ...]  # the loop's step times in the window
    waits: tuple[float, ...]  # its waits in next() in the window
    elapsed: float  # window seconds
    segment_elapsed: float  # seconds since these workers started
    busy: float  # worker busy seconds in the segment (their clocks)
    made: float  # batches the workers made in the segment
    cpu: float | None  # worker CPU seconds in the segment; None where /proc cannot tell
    queued: float  # worker seconds runnable but waiting for a core, in the segment
    main_cpu: float  # the training process's CPU seconds in the window
    cores: int


@dataclass(frozen=True)
class Estimate:
    """What the measurements say about the pipeline."""

    p: float  # worker wall seconds per batch, without waiting for a core
    s: float  # worker CPU seconds per batch
    step: float  # median consumer step
    wait_fraction: float  # share of the loop's time spent waiting for batches
    starving: bool  # wait fraction above the threshold
    delivered_rate: float  # batches/s the loop got in the window
    cpu_rate: float  # batches/s the free cores can make
    saturated: bool  # workers busy all the time, or the cores all used

    def production(self, workers: int) -> float:
        """Batches/s `workers` can deliver to this consumer (0 workers: the loop makes them itself)."""
        return min(workers / self.p if workers else 1 / (self.p + self.step), self.cpu_rate, 1 / self.step)


def estimate(seen: Observed, starve_threshold: float) -> Estimate:
    """The model's figures from one window's measurements."""
    n = seen.workers
    steps = np.asarray(seen.steps)
    waits = np.asarray(seen.waits[-len(seen.steps):] or (0.0,))
    step = float(np.median(steps))
    # A long step now and then (validation, checkpointing) must not read as a slow consumer.
    loop = float(np.minimum(steps, 5 * step).sum() + waits.sum())
    wait_fraction = float(waits.sum()) / loop if loop > 0 else 0.0
    elapsed = max(seen.elapsed, 1e-9)
    delivered_rate = len(steps) / elapsed
    known = seen.cpu is not None
    if n == 0:  # the main process produces: its wait is the production time
        p = s = float(np.median(waits))
    elif seen.made >= 1:
        p = seen.busy / seen.made
        s = seen.cpu / seen.made if seen.cpu is not None else p
        # Time runnable but waiting for a core is contention, not the work: without it, p is what a worker
        # would take with a core of its own.
        p = max(s, p - max(0.0, seen.queued) / seen.made) if known else p
    else:  # no batch finished in a worker in the whole segment: production is at least this slow
        p = s = elapsed * n
    p, s = max(p, 1e-6), max(min(s, p), 1e-6)
    main_cores = max(0.0, seen.main_cpu / elapsed - (n == 0) * s * delivered_rate)
    # Workers cannot have every cycle: the kernel, the training process receiving batches and the workers'
    # own threads need some, and a core run at 100% makes everything on it wait.
    free_cores = max(0.5, CPU_USABLE * (seen.cores - main_cores))
    # Are the workers the limit? Busy all the time, or the cores all used: then neither a deeper prefetch nor
    # one more worker can help, only a cheaper batch (and a restart would cost a second of nothing).
    segment = max(seen.segment_elapsed, 1e-9)
    busy_fraction = seen.busy / (n * segment) if n else 1.0
    cores_used = (seen.cpu / segment if seen.cpu is not None else n * busy_fraction) + main_cores
    saturated = busy_fraction >= SATURATED or cores_used >= SATURATED * seen.cores
    return Estimate(p, s, step, wait_fraction, wait_fraction > starve_threshold, delivered_rate, free_cores / s,
                    saturated)


@dataclass(frozen=True)
class Context:
    """What a proposal depends on besides the estimate: the current setting, the limits, the run so far."""

    setting: Setting
    tune_workers: bool
    tune_prefetch: bool
    min_workers: int
    max_workers: int
    headroom: float
    starve_threshold: float
    shrink_surplus: float
    prefetch_choices: tuple[int, ...]  # in batches, ascending
    budget: int  # bytes
    worker_memory: int  # bytes of one worker's private memory
    batch_bytes: int
    bundle: int
    cores: int
    overhead_s: float  # measured cost of stopping and starting workers
    horizon: int  # batches a better setting would pay off over
    experiments: bool  # may try a setting the model does not ask for
    floor: int  # workers an experiment showed to deliver more than the model said
    model_need: int  # workers the model asked for at the previous decision


@dataclass(frozen=True)
class Proposal:
    """A decision: `setting` (None: keep the current one) and why, with what the tuner keeps for the next one."""

    setting: Setting | None
    reason: str
    limit: str  # what bounds the worker count: "consumer", "cpu", "memory", "max_workers", "fixed num_workers"
    need: int | None  # workers the model asks for (None when the worker count is fixed)
    restart_s: float | None  # the restart cost weighed, when a change was weighed
    experiment: bool  # the proposal tries a setting the model does not ask for


def memory_estimate(setting: Setting, worker_memory: int, batch_bytes: int, bundle: int) -> int:
    """Bytes a setting is expected to use: each worker's private memory plus the batches it holds in flight
    (prefetched ones, the one it builds, one held by the training loop)."""
    if setting.workers == 0:
        return 0
    return setting.workers * (worker_memory + (setting.prefetch + 2 * bundle) * batch_bytes)


def memory_cap(ctx: Context, prefetch: int) -> int:
    """The most workers the memory budget allows at `prefetch`."""
    one = memory_estimate(Setting(1, prefetch), ctx.worker_memory, ctx.batch_bytes, ctx.bundle)
    return int(ctx.budget // max(one, 1))


def workers_needed(est: Estimate, ctx: Context) -> tuple[int, str, str, int | None]:
    """(workers, why, limit, the model's need) for this consumer, within max_workers and the memory budget."""
    n = ctx.setting.workers
    if not ctx.tune_workers:
        return n, "num_workers is fixed", "fixed num_workers", None
    want = ctx.headroom / max(est.step, 1e-6)  # batches/s to produce
    need = max(1, math.ceil(min(want, est.cpu_rate) * est.p - 1e-9))
    cap_memory = memory_cap(ctx, ctx.setting.prefetch)
    caps = {"consumer": need, "max_workers": ctx.max_workers, "memory": cap_memory}
    limit = min(caps, key=lambda name: (caps[name], name != "consumer"))
    if limit == "consumer" and want > est.cpu_rate:
        limit = "cpu"
    chosen = max(ctx.min_workers if cap_memory >= ctx.min_workers else 0, min(caps.values()))
    text = (f"workers take {1e3 * est.p:.1f} ms per batch ({1e3 * est.s:.1f} ms CPU), the step {1e3 * est.step:.1f} "
            f"ms: {chosen} workers make {min(chosen / est.p, est.cpu_rate):.1f} batches/s for a need of {want:.1f}")
    if limit == "cpu":
        text += f" (CPU-bound: {ctx.cores} cores make at most {est.cpu_rate:.1f}/s)"
    elif limit == "memory":
        text += f" (memory budget {ctx.budget / 2**20:,.0f} MB allows {cap_memory})"
    elif limit == "max_workers":
        text += f" (max_workers {ctx.max_workers})"
    return chosen, text, limit, need


def prefetch_needed(est: Estimate, ctx: Context, workers: int, jitter: float) -> int:
    """The prefetch depth for `workers`: deeper when waits come although production keeps up (`jitter`, the wait
    fraction), never beyond the memory budget."""
    k = ctx.setting.prefetch
    if not ctx.tune_prefetch or workers == 0:
        return k
    choices = ctx.prefetch_choices
    fits = [c for c in choices
            if memory_estimate(Setting(workers, c), ctx.worker_memory, ctx.batch_bytes, ctx.bundle) <= ctx.budget]
    if not fits:
        return choices[0]
    keeping_up = workers / est.p >= ctx.headroom / max(est.step, 1e-6)
    if workers == ctx.setting.workers and keeping_up and jitter > ctx.starve_threshold:
        bigger = [c for c in fits if c > k]  # enough production on average, yet waits: bursts, so deepen
        return bigger[0] if bigger else k
    return k if k in fits else max(fits)


def propose(est: Estimate, ctx: Context) -> Proposal:
    """The setting for the rest of the run, or None to keep the current one (see the module docstring)."""
    n, k = ctx.setting.workers, ctx.setting.prefetch
    new_n, why, limit, need = workers_needed(est, ctx)
    caps = min(ctx.max_workers, memory_cap(ctx, k))
    if new_n < ctx.floor <= caps:
        new_n, why = ctx.floor, f"{ctx.floor} workers delivered more than the model expected; keeping them"
    # Waits while production is saturated are a throughput deficit, not bursts a deeper prefetch would absorb.
    jitter = 0.0 if est.saturated or not ctx.experiments else est.wait_fraction
    new_k = prefetch_needed(est, ctx, new_n, jitter)
    rate_now = est.production(n)
    if est.starving:
        rate_now = min(rate_now, est.delivered_rate)  # what arrives is what the workers really make
    if new_n == n and new_k == k and ctx.tune_workers and est.starving and not est.saturated and ctx.experiments \
            and est.delivered_rate < 0.9 * min(n / est.p, est.cpu_rate, 1 / est.step) and n < caps:
        # The model says n workers suffice, yet the loop waits: trust the measurement, try one more.
        new_n, why = n + 1, (f"waiting {est.wait_fraction:.0%} of the time at {est.delivered_rate:.1f} batches/s "
                             f"although {n} workers should make {n / est.p:.1f}/s: one more worker")
    keep = Proposal(None, "", limit, need, None, False)
    if (new_n, new_k) == (n, k):
        return keep
    # An experiment: the model says the workers suffice, the measurement says the loop waits.
    experiment = new_n == n + 1 and new_n > (need if need is not None else ctx.model_need) or (new_n == n and new_k > k)
    if experiment:
        rate_now = est.delivered_rate  # the model already promised more than this: judge by what was measured
    # A restart costs the stop and start measured, plus the wait for the new workers' first batch (their first
    # bundle holds one, see `stages.Bundler`); the batches the old workers were building are lost.
    restart = ctx.overhead_s + est.p
    keep = Proposal(None, "", limit, need, restart, False)
    saved = ctx.horizon / max(rate_now, 1e-9) - ctx.horizon / max(est.production(new_n), 1e-9)
    over_budget = memory_estimate(ctx.setting, ctx.worker_memory, ctx.batch_bytes, ctx.bundle) > ctx.budget
    shrinking = new_n < n and new_n <= ctx.shrink_surplus * n and not est.starving
    if (new_n > n or experiment) and saved < restart and not over_budget:
        return keep  # not worth a restart
    if new_n < n and not (shrinking or over_budget):
        return keep  # hysteresis: a small surplus of workers costs little
    if new_n == n and not (new_k != k and est.starving) and not over_budget:
        return keep
    if new_k != k:
        why += f"; prefetch {new_k}" + (" to absorb jitter (waiting although workers keep up)"
                                        if new_k > k else " to fit the memory budget")
    return Proposal(Setting(new_n, new_k), why, limit, need, restart, experiment)
