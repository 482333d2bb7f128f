"""Online tuning of `num_workers` and `prefetch_factor` for stoker.DataLoader (see docs/autotune.md).

The tuner only observes and decides; the loader acts. Per batch it is told how long the training loop waited in
`next()` and how long it spent on the previous batch (its step). Workers add the time they spend producing
batches to a shared-memory clock (`WorkerClock`), and the tuner reads the workers' CPU time and private memory
from /proc. From these the model (`tuning.py`, pure functions) estimates the pipeline:

    p  worker wall time per batch (one worker), s  worker CPU time per batch, c  consumer step time
    rate with n workers  = min(n / p, free cores / s)         need  n = ceil(headroom * p / c)

and proposes a new setting when the model says the current one starves the consumer (or wastes workers), the
expected time saved outweighs the measured cost of restarting the workers, and the memory budget allows it.
A change is applied by the loader at a batch boundary by re-dealing the rest of the epoch to the new worker count,
exactly as a resume from a checkpoint would (`order.py`): the batches delivered do not change.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stoker.dataloader import workers
from stoker.errors import ConfigError
from stoker.dataloader import tuning
from stoker.dataloader.tuning import Setting
from stoker.options import cpu_cores, parse_size

AUTO = "auto"
DEFAULT_BUDGET = "4GB"
MAX_CLOCK_SLOTS = 256  # worker ids the shared clock has room for
_WORKER_MEMORY_GUESS = 64 << 20  # private memory of a worker before one was measured


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is no /proc."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_budget(value: str | int = DEFAULT_BUDGET) -> int:
    """The bytes the loader's workers may use: `value`, but never more than half of the memory available now."""
    budget = parse_size(value, "memory_budget")
    free = available_memory()
    return budget if free is None else max(1, min(budget, free // 2))


@dataclass(frozen=True)
class AutotuneConfig:
    """How the tuner decides; the defaults suit training steps of milliseconds to seconds."""

    start_workers: int = 1  # "start small"
    # Prefetch depths count *messages* in flight per worker; a message carries `bundle` batches (small batches
    # travel in bundles, docs/dataloader.md), so the prefetch_factor set is depth x bundle. Two messages are the
    # least that lets a worker build its next bundle while the previous one waits to be used.
    start_prefetch: int = 2
    min_workers: int = 1
    max_workers: int | None = None  # None: 4 x the usable cores (I/O-bound stages can use more workers than cores)
    prefetch_choices: tuple[int, ...] = (2, 4, 8)
    headroom: float = 1.15  # aim to produce this much faster than the consumer eats
    starve_threshold: float = 0.05  # wait fraction above which the consumer counts as starved
    interval_s: float = 0.5  # seconds between decisions
    min_batches: int = 8  # batches a measurement needs (after the first batch of a segment)
    cooldown_s: float = 1.0  # seconds after a restart before the next decision
    shrink_surplus: float = 0.75  # shrink only when the need is below this fraction of the workers running

    def __post_init__(self) -> None:
        if self.min_workers < 0 or self.start_workers < max(self.min_workers, 1):
            raise ConfigError(f"need 0 <= min_workers and 1 <= start_workers >= min_workers, got {self}")
        if self.max_workers is not None and self.max_workers < max(self.start_workers, self.min_workers):
            raise ConfigError(f"max_workers {self.max_workers} is below start_workers/min_workers")
        if not self.prefetch_choices or min(self.prefetch_choices) < 1 or self.start_prefetch < 1:
            raise ConfigError(f"prefetch choices must be >= 1, got {self.prefetch_choices}, {self.start_prefetch}")
        if self.headroom < 1 or self.interval_s <= 0 or self.min_batches < 1:
            raise ConfigError(f"need headroom >= 1, interval_s > 0, min_batches >= 1, got {self}")


@dataclass(frozen=True)
class Change:
    """One decision: at `batch` (delivered in `epoch`), from `old` to `new`, because `reason`."""

    epoch: int
    batch: int
    seconds: float  # since the loader's first batch
    old: Setting
    new: Setting
    reason: str

    def __str__(self) -> str:
        return (f"epoch {self.epoch} batch {self.batch} (+{self.seconds:.1f} s): workers {self.old.workers}->"
                f"{self.new.workers}, prefetch {self.old.prefetch}->{self.new.prefetch}: {self.reason}")


@dataclass(frozen=True)
class TuningReport:
    """What the tuner chose, why, and what it measured (over its last measurement window)."""

    workers: int
    prefetch: int
    tuned: tuple[str, ...]  # "num_workers", "prefetch_factor"
    history: tuple[Change, ...]
    batches_per_s: float | None  # delivered to the training loop, on average since its first batch
    produced_per_s: float | None  # what the workers could produce (n / p, capped by free CPU)
    step_ms: float | None  # the consumer's step time (median)
    wait_fraction: float | None  # share of the loop's time spent waiting for batches
    keeps_up: bool | None  # wait fraction at or below the threshold
    worker_ms_per_batch: float | None  # p: one worker's wall time per batch
    worker_cpu_ms_per_batch: float | None  # s: one worker's CPU time per batch
    restart_s: float | None  # measured cost of (re)starting the workers
    cores: int
    memory_budget: int
    memory_estimate: int | None  # bytes the current setting is estimated to use
    limit: str  # what bounds the worker count now: "consumer", "cpu", "memory", "max_workers", ...

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = [dict(asdict(c), old=asdict(c.old), new=asdict(c.new)) for c in self.history]
        return out

    def __str__(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None or not math.isfinite(value) else format(value, fmt)

        state = {True: "keeps up", False: "STARVING", None: "not measured yet"}[self.keeps_up]
        lines = [
            f"autotune: workers {self.workers}, prefetch {self.prefetch} ({', '.join(self.tuned)} tuned; "
            f"bounded by {self.limit}); input {state}",
            f"  measured  {num(self.batches_per_s, '.1f')} batches/s delivered, workers can make "
            f"{num(self.produced_per_s, '.1f')}/s; step {num(self.step_ms, '.1f')} ms; waiting "
            f"{num(None if self.wait_fraction is None else 100 * self.wait_fraction, '.1f')}% of the time",
            f"  workers   {num(self.worker_ms_per_batch, '.1f')} ms wall, {num(self.worker_cpu_ms_per_batch, '.1f')} "
            f"ms CPU per batch each; restart {num(self.restart_s, '.2f')} s; {self.cores} cores; memory "
            f"{num(None if self.memory_estimate is None else self.memory_estimate / 2**20, ',.0f')} of "
            f"{self.memory_budget / 2**20:,.0f} MB",
        ]
        lines += [f"  change    {c}" for c in self.history] or ["  change    none"]
        return "\n".join(lines)


class WorkerClock:
    """Busy seconds and batches per worker, in shared memory: each worker adds to its own row."""

    def __init__(self) -> None:
        self.tensor = torch.zeros((MAX_CLOCK_SLOTS, 2), dtype=torch.float64).share_memory_()

    def totals(self) -> tuple[float, float]:
        busy, batches = self.tensor.numpy().sum(axis=0)
        return float(busy), float(batches)

    def reset(self) -> None:
        self.tensor.zero_()


class Timed(IterableDataset):
    """Wraps the loader's dataset view so that each worker times the production of its batches."""

    def __init__(self, view: Any, clock: WorkerClock) -> None:
        self.view, self.clock = view, clock

    def __iter__(self) -> _TimedIterator:
        return _TimedIterator(iter(self.view), self.clock)


class _TimedIterator:
    def __init__(self, inner: Any, clock: WorkerClock) -> None:
        info = get_worker_info()
        self.inner = inner
        self.row = clock.tensor.numpy()[(info.id if info is not None else 0) % MAX_CLOCK_SLOTS]

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        item = next(self.inner)
        self.row[0] += time.perf_counter() - start
        if isinstance(item, workers.Bundle):
            self.row[1] += len(item.items)
        elif isinstance(item, workers.WireBundle):
            self.row[1] += len(item.parts)
        else:
            self.row[1] += 1
        return item


def batch_bytes(batch: Any) -> int:
    """Bytes of tensors, arrays and buffers in a batch (nested dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.nelement() * batch.element_size()
    if isinstance(batch, (np.ndarray, memoryview, bytes, bytearray)):
        return batch.nbytes if not isinstance(batch, (bytes, bytearray)) else len(batch)
    if isinstance(batch, dict):
        return sum(batch_bytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_bytes(v) for v in batch)
    return 0


def _proc_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, seconds spent runnable but waiting for a core) of a process's main thread, from
    /proc/<pid>/schedstat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            ran, queued = f.read().split()[:2]
        return int(ran) / 1e9, int(queued) / 1e9
    except (OSError, ValueError):
        return None


def _proc_private(pid: int) -> int | None:
    """Resident memory of a process that is not shared with others (resident minus file-backed and shared pages),
    from /proc/<pid>/statm; None if unknown. statm is O(1); smaps_rollup walks the page tables (16 ms per call for a
    worker with mapped shards, while holding its memory lock)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            resident, shared = (int(v) for v in f.read().split()[1:3])
    except (OSError, ValueError):
        return None
    return max(0, resident - shared) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Window:
    """Measurements since the last decision (or restart)."""

    start: float
    busy: float
    made: float
    cpu: float
    queued: float
    main_cpu: float
    waits: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)


class Tuner:
    """Decides the loader's worker count and prefetch depth from what it measures; see the module docstring."""

    def __init__(self, config: AutotuneConfig, budget: int, tune_workers: bool, tune_prefetch: bool,
                 workers_given: int | None, prefetch_given: int | None, bundle: int = 1) -> None:
        self.config = config
        self.budget = budget
        self.cores = cpu_cores()
        self.max_workers = config.max_workers or max(4, 4 * self.cores)
        self.tune_workers, self.tune_prefetch = tune_workers, tune_prefetch
        workers_now = config.start_workers if tune_workers else int(workers_given or 0)
        self.bundle = max(1, bundle)
        self.prefetch_choices = sorted({c * self.bundle for c in config.prefetch_choices})
        prefetch_now = config.start_prefetch * self.bundle if tune_prefetch else int(prefetch_given or 2)
        if not tune_workers and workers_now == 0:
            raise ConfigError("prefetch_factor='auto' needs worker processes: pass num_workers > 0 or 'auto'")
        self.setting = Setting(workers_now, prefetch_now)
        self.clock = WorkerClock()
        self.history: list[Change] = []
        self.restart_s: float | None = None  # the last estimate of what a restart costs (see `decide`)
        self.overhead_s: float | None = None  # measured: stopping the old workers and starting new ones
        self.limit = "not decided yet"
        self._epoch, self._delivered = 0, 0
        self._total = 0  # batches delivered since the loader started, all epochs
        self._carried = 0  # batches of the old workers delivered at the start of this segment
        self._decisions = 0  # calls of `decide`
        self._model_need = 0  # workers the model asked for at the last decision
        self._experiments = True  # may try a setting the model does not ask for (off once one did not pay)
        self._floor = 0  # workers an experiment showed to deliver more than the model said
        self._trial: float | None = None  # delivered batches/s before the experiment now running
        self._t0: float | None = None  # the loader's first batch
        self._t_last: float | None = None  # the last batch delivered
        self._segment_start = 0.0
        self._segment_batches = 0
        self._pids: list[int] = []
        self._cpu_seen: dict[int, tuple[float, float]] = {}
        self._window: _Window | None = None
        self._segment: _Window | None = None
        self._t_out: float | None = None
        self._worker_memory: int | None = None
        self._batch_bytes = 0
        self._last: dict[str, float | None] = {}
        self._fresh = True

    # -- what the loader tells it ------------------------------------------------------------------------------

    def segment_started(self, epoch: int, delivered: int, pids: list[int], fresh: bool,
                        overhead_s: float = 0.0, carried: int = 0) -> None:
        """New workers (or a new epoch on persistent ones) start delivering from batch `delivered`, after `carried`
        batches the old workers had already sent; stopping the old workers and starting the new ones took
        `overhead_s`."""
        self._carried = carried
        now = time.perf_counter()
        if fresh:
            self.overhead_s = overhead_s if self.overhead_s is None else 0.5 * (self.overhead_s + overhead_s)
        self._epoch, self._delivered = epoch, delivered
        self._segment_start, self._segment_batches = now, 0
        self._pids = pids
        self._fresh = fresh
        if fresh:
            self.clock.reset()
            self._cpu_seen = {}
        # Worker costs count from the segment's start, so that the first bundles already measure them.
        self._segment = self._open_window(now)
        self._window = None
        self._t_out = None

    def before_next(self) -> float:
        """The loop asks for a batch: its previous step ends now. Returns the time."""
        now = time.perf_counter()
        if self._t_out is not None and self._window is not None:
            self._window.steps.append(now - self._t_out)
        return now

    def delivered(self, batch: Any, asked: float) -> None:
        """A batch was handed to the loop after it asked at `asked`."""
        now = time.perf_counter()
        self._segment_batches += 1
        self._delivered += 1
        self._total += 1
        self._t_last = now
        if self._t0 is None:
            self._t0 = asked
        if self._segment_batches == 1 + self._carried:
            # The first batch of a segment pays the workers' start-up and their first bundle: not a wait to model.
            self._batch_bytes = max(self._batch_bytes, batch_bytes(batch))
            self._window = self._open_window(now)
        elif self._window is not None:
            self._window.waits.append(now - asked)
        self._t_out = now

    def due(self, now: float) -> bool:
        w, seg = self._window, self._segment
        if w is None or seg is None or not (self.tune_workers or self.tune_prefetch):
            return False
        lump = self.bundle
        if self.first_decision:
            # The start is deliberately small: judge it as soon as one step and every worker's first bundle (one
            # batch: an epoch's bundles start small, `stages.Bundler`) have been timed. Each further bundle would
            # cost the loop time at the start's slow pace; a first batch that over-states a worker's cost (its
            # one-off start-up) is corrected by the next decision.
            if not w.steps:
                return False
            lump = 1
        elif len(w.steps) < self.config.min_batches or now - w.start < self.config.interval_s \
                or now - self._segment_start < self.config.cooldown_s:
            return False
        # Whole bundles from every worker, so that their costs mean something (bundles arrive in lumps).
        return self.setting.workers == 0 or self.clock.totals()[1] - seg.made >= self.setting.workers * lump

    @property
    def first_decision(self) -> bool:
        """Whether the start setting has not been judged yet."""
        return self._decisions == 0

    # -- deciding ------------------------------------------------------------------------------------------------

    def decide(self, now: float, remaining: int, epoch_length: int = 0) -> Setting | None:
        """A new setting for the rest of the epoch (`remaining` of `epoch_length` batches), or None to keep the
        current one. Call only when `due`. The model is `tuning.estimate` and `tuning.propose`; this keeps the
        bookkeeping around them (windows, experiments, history)."""
        w, seg = self._window, self._segment
        assert w is not None and seg is not None
        self._decisions += 1
        busy, made = self.clock.totals()
        (cpu, queued), main_cpu = self._cpu_total(), time.process_time()
        n = self.setting.workers
        seen = tuning.Observed(
            workers=n, steps=tuple(w.steps), waits=tuple(w.waits), elapsed=now - w.start,
            segment_elapsed=now - seg.start, busy=busy - seg.busy, made=made - seg.made,
            cpu=cpu - seg.cpu if cpu >= 0 and seg.cpu >= 0 else None, queued=queued - seg.queued,
            main_cpu=main_cpu - w.main_cpu, cores=self.cores,
        )
        est = tuning.estimate(seen, self.config.starve_threshold)
        worker_memory = self._measure_memory()
        self._last = {"batches_per_s": est.delivered_rate,
                      "produced_per_s": min(n / est.p, est.cpu_rate) if n else 1 / est.p,
                      "step_ms": 1e3 * est.step, "wait_fraction": est.wait_fraction, "p": est.p, "s": est.s}
        self._window = self._open_window(now)
        self._window.steps, self._window.waits = [], []

        if self._trial is not None:  # the first measurement since an experiment: did it pay?
            if est.delivered_rate < 1.03 * self._trial:
                self._experiments = False  # no: stop experimenting (the model may still move the setting)
            else:
                self._floor = n  # yes: the measurement beat the model, which must not take these workers back
            self._trial = None
        # A setting carries over to the following epochs, and a run is expected to go on at least as long as it
        # has gone so far: the gain counts over the longest of the epoch's rest, an epoch, and the run so far.
        proposal = tuning.propose(est, self._context(worker_memory, max(remaining, epoch_length, self._total)))
        self.limit = proposal.limit
        if proposal.need is not None:
            self._last["need"] = self._model_need = proposal.need
        if proposal.restart_s is not None:
            self.restart_s = proposal.restart_s
        if proposal.setting is None:
            return None
        self._record(proposal.setting, proposal.reason, now)
        self._trial = est.delivered_rate if proposal.experiment else None
        return proposal.setting

    def _context(self, worker_memory: int, horizon: int) -> tuning.Context:
        config = self.config
        return tuning.Context(
            setting=self.setting, tune_workers=self.tune_workers, tune_prefetch=self.tune_prefetch,
            min_workers=config.min_workers, max_workers=self.max_workers, headroom=config.headroom,
            starve_threshold=config.starve_threshold, shrink_surplus=config.shrink_surplus,
            prefetch_choices=tuple(self.prefetch_choices), budget=self.budget, worker_memory=worker_memory,
            batch_bytes=self._batch_bytes, bundle=self.bundle, cores=self.cores, overhead_s=self.overhead_s or 0.0,
            horizon=horizon, experiments=self._experiments, floor=self._floor, model_need=self._model_need,
        )

    # -- memory --------------------------------------------------------------------------------------------------

    def memory_estimate(self, setting: Setting, worker_memory: int | None = None) -> int:
        """Bytes a setting is expected to use (`tuning.memory_estimate` with this run's measurements)."""
        own = worker_memory if worker_memory is not None else (self._worker_memory or _WORKER_MEMORY_GUESS)
        return tuning.memory_estimate(setting, own, self._batch_bytes, self.bundle)

    def _measure_memory(self) -> int:
        sizes = [m for m in (_proc_private(pid) for pid in self._pids) if m is not None]
        if sizes:
            self._worker_memory = max(max(sizes), self._worker_memory or 0)
        return self._worker_memory or _WORKER_MEMORY_GUESS

    # -- helpers -------------------------------------------------------------------------------------------------

    def _cpu_total(self) -> tuple[float, float]:
        """(CPU seconds, runqueue seconds) of this segment's workers; (-1, 0) when /proc cannot tell."""
        for pid in self._pids:
            seen = _proc_cpu(pid)
            if seen is not None:
                self._cpu_seen[pid] = seen
        if not self._cpu_seen and self._pids:
            return -1.0, 0.0
        return sum(c for c, _ in self._cpu_seen.values()), sum(q for _, q in self._cpu_seen.values())

    def _open_window(self, now: float) -> _Window:
        busy, made = self.clock.totals()
        cpu, queued = self._cpu_total()
        return _Window(now, busy, made, cpu, queued, time.process_time())

    def _record(self, new: Setting, reason: str, now: float) -> None:
        since = now - self._t0 if self._t0 is not None else 0.0
        self.history.append(Change(self._epoch, self._delivered, since, self.setting, new, reason))
        self.setting = new

    def _run_rate(self) -> float | None:
        # Over the whole run: a decision window can open on a lump of bundles and read twice the real rate.
        if self._t0 is None or self._t_last is None or self._t_last <= self._t0:
            return None
        return self._total / (self._t_last - self._t0)

    def report(self) -> TuningReport:
        last = self._last
        wait = last.get("wait_fraction")
        return TuningReport(
            workers=self.setting.workers, prefetch=self.setting.prefetch,
            tuned=tuple(name for name, on in (("num_workers", self.tune_workers),
                                              ("prefetch_factor", self.tune_prefetch)) if on),
            history=tuple(self.history), batches_per_s=self._run_rate(),
            produced_per_s=last.get("produced_per_s"), step_ms=last.get("step_ms"), wait_fraction=wait,
            keeps_up=None if wait is None else wait <= self.config.starve_threshold,
            worker_ms_per_batch=None if "p" not in last else 1e3 * last["p"],
            worker_cpu_ms_per_batch=None if "s" not in last else 1e3 * last["s"],
            restart_s=self.restart_s, cores=self.cores, memory_budget=self.budget,
            memory_estimate=self.memory_estimate(self.setting) if self._window is not None else None,
            limit=self.limit,
        )


def worker_pids(iterator: Any) -> list[int]:
    """Pids of the worker processes of a torch DataLoader iterator (none for num_workers=0)."""
    return [w.pid for w in getattr(iterator, "_workers", []) if w.pid is not None]
