"""`stoker.monitor`: measure, inside a real training loop, how long each step waits for data, and why.

A step is split at the loader boundary: *wait* is the time spent inside `next()` on the loader's iterator, *compute*
is the time from handing the batch out until the loop asks for the next one. The data-wait fraction,
wait / (wait + compute), is the share of wall time the accelerator could not work for lack of input.

The first batches of each pass (one per loader worker: each carries its worker's start-up) are start-up, reported
apart, and so are the first batches after the loader restarts its workers (`worker_starts`: a re-deal of
`num_workers="auto"`, a new pass without persistent workers); the steady state alone decides whether the loop is
starving. When the loader reports per-stage clocks (`stage_times()`, as stoker's DataLoader does) the verdict names
the stage; see `stoker.perf.diagnosis`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from os import PathLike
from typing import Any

import torch

from stoker.errors import ConfigError, MissingExtraError
from stoker.perf import diagnosis, rank_rows
from stoker.perf.diagnosis import Phase, RunFacts
from stoker.perf.loader_facts import count_samples, run_facts, sample_counter, stage_source, tuning, worker_starts
from stoker.perf.monitor_report import format_report, plot_ranks
from stoker.perf.stats import RingBuffer, percentiles, rate

__all__ = ["Monitor", "MonitorConfig", "count_samples", "format_report", "monitor"]

_LOGGER = logging.getLogger("stoker.monitor")

_CSV_COLUMNS = ("kind", "rank", "unix_time", "step", "steps", "samples", "wait_s", "compute_s",
                "data_wait_fraction", "steps_per_s", "samples_per_s", "starving", "state", "stage")


@dataclass(frozen=True)
class MonitorConfig:
    """Options of `monitor`; every field can also be passed to `monitor(...)` as a keyword."""

    log_every: int = 100  # steps between one-line summaries; 0 turns the step trigger off
    log_every_s: float = 0.0  # seconds between one-line summaries; 0 turns the time trigger off
    log: logging.Logger | Callable[[str], Any] | None = None  # None: the "stoker.monitor" logger
    starve_threshold: float = 0.05  # steady-state data-wait fraction above which the loop is "starving"
    min_steady_steps: int = diagnosis.MIN_STEADY_STEPS  # fewer steps after start-up: "too short to judge"
    window: int = 4096  # recent steps kept for percentiles
    batch_size: int | Callable[[Any], int] | None = None  # None: read it from each batch
    cuda: bool | None = None  # None: sync only if CUDA is available and already initialized
    cuda_sync_every: int = 10  # synchronize CUDA before timing every N-th step; 0 never
    distributed: bool | None = None  # None: aggregate over ranks if torch.distributed is initialized
    csv_path: str | PathLike[str] | None = None  # may contain "{rank}"; otherwise only rank 0 writes
    json_path: str | PathLike[str] | None = None  # the final report as JSON; "{rank}" as for csv_path
    tensorboard_dir: str | PathLike[str] | None = None  # written by rank 0 only
    plot: str | PathLike[str] | None = None  # PNG of time per stage per rank, by rank 0 (needs stoker[plot])

    def __post_init__(self) -> None:
        if not 0 < self.starve_threshold < 1:
            raise ConfigError(f"starve_threshold must be in (0, 1), got {self.starve_threshold}")
        for name in ("log_every", "cuda_sync_every", "min_steady_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.log_every_s < 0:
            raise ConfigError(f"log_every_s must be >= 0, got {self.log_every_s}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"window must be an int >= 1, got {self.window!r}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def monitor(loader: Iterable[Any], config: MonitorConfig | None = None, **options: Any) -> Monitor:
    """Wrap `loader` so iterating it measures data wait; keywords override fields of `config` (MonitorConfig)."""
    config = config or MonitorConfig()
    if options:
        known = {f.name for f in fields(MonitorConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown monitor option(s) {unknown}; known: {sorted(known)}")
        config = replace(config, **options)
    return Monitor(loader, config)


class Monitor:
    """An iterable over `loader` that times every step; also a context manager that reports on exit.

    Create it after `torch.distributed.init_process_group`, on every rank: `report()` and `close()` are
    collectives when aggregating across ranks.
    """

    def __init__(self, loader: Iterable[Any], config: MonitorConfig) -> None:
        self.loader = loader
        self.config = config
        self.last_report: dict[str, Any] | None = None
        self._sync_every = _cuda_sync_every(config)
        self._rank, self._world, self._aggregate = _distributed_info(config)
        if config.plot is not None and self._rank == 0:
            plot_ranks([], None)  # a missing extra fails now, not after the whole run
        self._count = sample_counter(config.batch_size)
        self._facts = run_facts(loader)
        self._starts = worker_starts(loader)  # () -> (worker starts so far, first batch of the newest), or None
        self._seen_starts = self._starts()[0] if self._starts is not None else 0
        self._rows = RingBuffer(config.window, width=3)  # (wait, compute, 1 if start-up) seconds of completed steps
        self._steps = 0
        self._samples: int | None = 0  # None once a batch could not be counted
        self._wait_s = 0.0
        self._compute_s = 0.0
        self._startup = [0, 0.0, 0.0]  # steps, wait, compute of start-up (epoch ends' shutdown wait included)
        self._restarts = [0, 0, 0.0, 0.0]  # worker restarts, and the steps, wait, compute of start-up after them
        self._startup_until = 0  # the pass's steps up to this one are start-up
        self._restarting = False  # whether the current start-up follows a worker restart
        self._first_batch_s = math.nan
        self._it: Any = None
        self._pass_steps = 0  # steps in the current pass
        self._iter_wait = 0.0  # time spent in iter(loader), charged to the next step's wait
        self._pending_wait = 0.0  # wait of the step whose compute is still running
        self._pending_startup = False  # whether that step is a start-up step
        self._pending_restart = False  # whether it is start-up after a worker restart
        self._t_out: float | None = None  # when the last batch was handed out; None if no step is running
        self._stage_source = stage_source(loader)
        self._stage_base = self._stage_times()  # before monitoring: not this run's
        self._stage_pass_start: dict[str, float] | None = None  # at the start of a pass still in start-up
        self._stage_startup: dict[str, float] = {}  # stage seconds spent during start-up steps
        self._last_log = (0, 0.0, 0.0, 0, time.perf_counter(), 0, 0.0, 0.0)  # totals + time + start-up at last log
        self._logged_steps = -1  # steps at the last logged report
        self._recorded_steps = -1  # steps at the last "total" row written to CSV / TensorBoard
        self._saved: tuple[int, bool] | None = None  # (steps, all ranks) of the report last saved as JSON / PNG
        self._closed = False
        self._csv_file = _per_rank_path(config.csv_path, self._rank)
        self._json_file = _per_rank_path(config.json_path, self._rank)
        self._csv_started = False
        self._tb = _open_tensorboard(config.tensorboard_dir) if self._rank == 0 else None

    # ---- iteration: keep the per-step work to two perf_counter() calls and one ring-buffer row ----

    def __iter__(self) -> Monitor:
        # A pass abandoned mid-step (break, then a new for-loop): its last compute is unknown, so drop it rather
        # than charge whatever the user did in between (validation, checkpointing) as compute.
        self._t_out = None
        self._end_startup()  # a pass abandoned during its start-up
        self._pass_steps = 0
        self._stage_pass_start = self._stage_times()
        start = time.perf_counter()
        self._it = iter(self.loader)
        self._iter_wait = time.perf_counter() - start  # e.g. DataLoader starting its workers: the GPU waits
        self._startup_until = self._workers_startup()
        self._restarting = False
        if self._starts is not None:
            starts = self._starts()[0]
            # Workers started again by a loader that had started some before: a new pass without persistent ones.
            self._restarting = starts > self._seen_starts > 0
            self._restarts[0] += self._restarting
            self._seen_starts = starts
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self.__iter__()
        if self._sync_every and self._steps % self._sync_every == 0:
            # Queued GPU work finishes here, counted as compute, so the wait timed below is pure data wait.
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self._t_out is not None:
            self._finish_step(t0 - self._t_out)
        try:
            batch = next(self._it)
        except StopIteration:
            idle = time.perf_counter() - t0 + self._iter_wait  # loader shutdown: idle, but not a step
            self._wait_s += idle
            self._startup[1] += idle  # an epoch boundary, reported with start-up
            self._iter_wait, self._t_out, self._it = 0.0, None, None
            self._end_startup()
            self.report(aggregate=False)
            raise
        t1 = time.perf_counter()
        wait = t1 - t0 + self._iter_wait
        self._iter_wait = 0.0
        self._wait_s += wait
        self._pending_wait = wait
        self._steps += 1
        if self._starts is not None:
            starts, first = self._starts()  # one property read a step: a mid-pass restart (re-deal) shows here
            if starts != self._seen_starts:
                self._restarted(starts, first)
        self._pass_steps += 1
        self._pending_startup = self._pass_steps <= self._startup_until
        self._pending_restart = self._pending_startup and self._restarting
        if self._pending_startup:
            self._startup[0] += 1
            self._startup[1] += wait
            if self._pending_restart:
                self._restarts[1] += 1
                self._restarts[2] += wait
            if self._pass_steps == self._startup_until:
                self._end_startup()
                self._restarting = False
        if self._steps == 1:
            self._first_batch_s = wait
        if self._samples is not None:
            n = self._count(batch)
            self._samples = None if n is None else self._samples + n
        if (self.config.log_every and self._steps % self.config.log_every == 0) or (
            self.config.log_every_s and t1 - self._last_log[4] >= self.config.log_every_s
        ):
            self._log_interval()
            t1 = time.perf_counter()  # the monitor's own logging is neither wait nor compute
        self._t_out = t1
        return batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # After an exception other ranks may never reach their report: a collective here could hang the job.
        self.close(aggregate=exc_type is None)

    # ---- results ----

    def metrics(self) -> dict[str, Any]:
        """Return this rank's cumulative metrics as a dict (no communication)."""
        elapsed = self._wait_s + self._compute_s
        fraction = self._wait_s / elapsed if elapsed > 0 and self._steps else math.nan  # no step, no verdict
        rows = self._rows.values()
        steady_rows = rows[rows[:, 2] == 0] if len(rows) else rows
        step_ms = percentiles(steady_rows[:, :2].sum(axis=1) * 1e3, (50, 90))
        wait_ms = percentiles(steady_rows[:, 0] * 1e3, (50, 90, 100))
        stages = self._steady_stage_times()
        # A stoker.DataLoader over a map-style dataset with workers has the method but nothing to report.
        judged = self._diagnose(self._steady(), self._startup_phase(), stages or None,
                                replace(self._facts, has_stage_times=bool(stages)))
        starving = judged.state == diagnosis.STARVING
        total = sum(stages.values()) if stages else 0.0
        return {
            "rank": self._rank,
            "world_size": self._world,
            "steps": self._steps,
            "samples": self._samples,
            "elapsed_s": elapsed,
            "wait_s": self._wait_s,
            "compute_s": self._compute_s,
            "data_wait_fraction": fraction,
            "steady": rank_rows.phase_dict(judged.steady),
            "startup": rank_rows.phase_dict(judged.startup),
            "restarts": {"count": self._restarts[0],
                         **rank_rows.phase_dict(Phase(self._restarts[1], self._restarts[2], self._restarts[3]))},
            "steps_per_s": rate(self._steps, elapsed),
            "samples_per_s": None if self._samples is None else rate(self._samples, elapsed),
            "samples_per_s_if_fed": None if self._samples is None else rate(self._samples, self._compute_s),
            "first_batch_s": self._first_batch_s,
            "step_ms_p50": step_ms[50],
            "step_ms_p90": step_ms[90],
            "wait_ms_p50": wait_ms[50],
            "wait_ms_p90": wait_ms[90],
            "wait_ms_max": wait_ms[100],
            "starve_threshold": self.config.starve_threshold,
            "state": judged.state,
            "headline": judged.headline,
            "starving": starving,
            "bottleneck": _bottleneck(judged.state),
            "bottleneck_stage": judged.stage,
            "stage_seconds": stages,
            "stage_ms_per_batch": {k: v * 1e3 for k, v in judged.stage_costs.items()},
            "stage_shares": {k: v / total for k, v in stages.items()} if total > 0 else {},
            "num_workers": self._facts.num_workers,
            "backend": self._facts.backend,
            "advice": list(judged.advice),
        }

    def report(self, *, aggregate: bool = True, log: bool = True) -> dict[str, Any]:
        """Build the report, across ranks when distributed (a collective: call it on every rank), and log it."""
        local = self.metrics()
        everyone = aggregate and self._aggregate
        if everyone:
            ranks = self._gather(local)
            for row in ranks:  # each rank judged with its own facts, its headline naming it among several
                facts = replace(self._facts, num_workers=row["num_workers"],
                                has_stage_times=row["has_stage_times"], backend=row["backend"])
                judged = self._diagnose(Phase(row["steady_steps"], row["steady_wait_s"], row["steady_compute_s"]),
                                        Phase(row["startup_steps"], row["startup_wait_s"], row["startup_compute_s"]),
                                        row["stage_seconds"] if row["has_stage_times"] else None, facts,
                                        where=f" on rank {row['rank']}" if len(ranks) > 1 else "")
                row.update(state=judged.state, headline=judged.headline, advice=list(judged.advice),
                           stage=judged.stage,
                           stage_ms_per_batch={k: v * 1e3 for k, v in judged.stage_costs.items()})
        else:  # this rank alone: `metrics` has judged it already
            ranks = [rank_rows.rank_row(local)]
            ranks[0].update(state=local["state"], headline=local["headline"], advice=local["advice"],
                            stage=local["bottleneck_stage"], stage_ms_per_batch=local["stage_ms_per_batch"])
        # Under DDP every rank runs at the pace of the slowest, which waits in next() while the others wait in
        # all-reduce (counted as their compute): the slowest rank is the one with most steady data wait per step.
        slowest = max(ranks, key=rank_rows.wait_per_step)
        fractions = [r["data_wait_fraction"] for r in ranks if not math.isnan(r["data_wait_fraction"])]
        samples = [r["samples_per_s"] for r in ranks]
        states = {r["state"] for r in ranks}
        state = diagnosis.STARVING if diagnosis.STARVING in states else slowest["state"]
        starving = state == diagnosis.STARVING
        result = {
            "scope": "all ranks" if everyone or self._world == 1 else f"rank {self._rank} of {self._world} only",
            "world_size": len(ranks),
            "ranks": ranks,
            "slowest_rank": slowest["rank"],
            "state": state,
            "headline": slowest["headline"],
            "advice": slowest["advice"],
            "data_wait_fraction": slowest["data_wait_fraction"],
            "steady_data_wait_fraction": slowest["steady_data_wait_fraction"],
            "mean_data_wait_fraction": sum(fractions) / len(fractions) if fractions else math.nan,
            "steps_per_s": min(r["steps_per_s"] for r in ranks),
            "samples_per_s": None if any(math.isnan(s) for s in samples) else sum(samples),
            "starving": starving,
            "bottleneck": _bottleneck(state),
            "bottleneck_stage": slowest["stage"],
            "local": local,
            "tuning": tuning(self.loader),
        }
        self.last_report = result
        if log and (not everyone or self._rank == 0):  # an all-ranks report is logged once, by rank 0
            self._emit(format_report(result))
            self._logged_steps = self._steps
        if self._steps != self._recorded_steps:  # a pass-end report followed by close() adds no new row
            self._recorded_steps = self._steps
            self._write_outputs(result, local)
        if (self._steps, everyone) != self._saved:  # the all-ranks report replaces this rank's pass-end one
            self._saved = (self._steps, everyone)
            self._save(result)
        return result

    def close(self, *, aggregate: bool = True) -> dict[str, Any] | None:
        """Finish the running step, report (see `report`) and close the TensorBoard writer; idempotent."""
        if self._closed:
            return self.last_report
        if self._t_out is not None:
            self._finish_step(time.perf_counter() - self._t_out)
            self._t_out = None
        # Do not repeat the report a finished pass just logged, unless this one adds the other ranks.
        repeat = self._steps == self._logged_steps and not (aggregate and self._aggregate)
        result = self.last_report if repeat else self.report(aggregate=aggregate)
        if self._tb is not None:
            self._tb.close()
        self._closed = True
        return result

    # ---- helpers ----

    def _finish_step(self, compute: float) -> None:
        self._compute_s += compute
        if self._pending_startup:
            self._startup[2] += compute
        if self._pending_restart:
            self._restarts[3] += compute
        self._rows.append(self._pending_wait, compute, float(self._pending_startup))

    def _diagnose(self, steady: Phase, startup: Phase, stages: Mapping[str, float] | None, facts: RunFacts,
                  where: str = "") -> diagnosis.Diagnosis:
        return diagnosis.diagnose(steady, startup, stages, facts, self.config.starve_threshold,
                                  min_steps=self.config.min_steady_steps, where=where)

    def _steady(self) -> Phase:
        steps, wait, compute = self._startup
        return Phase(self._steps - steps, self._wait_s - wait, self._compute_s - compute)

    def _startup_phase(self) -> Phase:
        return Phase(*self._startup)

    def _stage_times(self) -> dict[str, float] | None:
        if self._stage_source is None:
            return None
        times = self._stage_source() if callable(self._stage_source) else self._stage_source
        return {str(k): float(v) for k, v in times.items()}

    def _workers_startup(self) -> int:
        # Read at each start: an autotuned loader changes its number of workers.
        workers = getattr(self.loader, "num_workers", None)
        return diagnosis.startup_steps(workers if isinstance(workers, int) else None)

    def _restarted(self, starts: int, first: int) -> None:
        """The loader started new workers during this step: their first batches (and the ones it delivers before
        them, received from the old workers) are start-up, charged to the restart."""
        self._restarts[0] += starts - self._seen_starts
        self._seen_starts = starts
        # At least this step: the window then ends at a step this pass reaches, which closes its stage accounting.
        self._startup_until = max(self._startup_until, first + self._workers_startup(), self._pass_steps + 1)
        self._restarting = True
        if self._stage_pass_start is None:
            self._stage_pass_start = self._stage_times()

    def _end_startup(self) -> None:
        """Charge the stage time since the pass started to start-up (once per pass)."""
        if self._stage_pass_start is None:
            return
        now = self._stage_times() or {}
        for name, seconds in now.items():
            spent = seconds - self._stage_pass_start.get(name, 0.0)
            self._stage_startup[name] = self._stage_startup.get(name, 0.0) + spent
        self._stage_pass_start = None

    def _steady_stage_times(self) -> dict[str, float]:
        now = self._stage_times()
        if now is None:
            return {}
        base, startup, pending = self._stage_base or {}, self._stage_startup, self._stage_pass_start or {}
        steady = {}
        for name, seconds in now.items():
            value = seconds - base.get(name, 0.0) - startup.get(name, 0.0)
            if self._stage_pass_start is not None:  # still in this pass's start-up
                value -= seconds - pending.get(name, 0.0)
            if value > 0:
                steady[name] = value
        return steady

    def _log_interval(self) -> None:
        steps0, wait0, compute0, samples0, _, ssteps0, swait0, scompute0 = self._last_log
        steps, wait = self._steps - steps0, self._wait_s - wait0
        elapsed = wait + self._compute_s - compute0
        fraction = wait / elapsed if elapsed > 0 else math.nan
        # The running step's compute is not known yet, so the interval's steady part counts the steps it finished.
        s_steps, s_wait, s_compute = self._startup
        steady = Phase(steps - (s_steps - ssteps0), wait - (s_wait - swait0),
                       elapsed - wait - (s_compute - scompute0))
        starving = steady.steps > 0 and steady.fraction > self.config.starve_threshold
        samples_per_s = None if self._samples is None else rate(self._samples - samples0, elapsed)
        stage = None
        if starving:
            steady_run = self._steady()
            costs = diagnosis.stage_costs(self._steady_stage_times(), max(steady_run.steps, 1),
                                          self._facts.num_workers)
            stage = diagnosis.blamed_stage(costs, steady_run, self._facts.num_workers)
        row = {"steps": steps, "samples": None if self._samples is None else self._samples - samples0,
               "wait_s": wait, "compute_s": elapsed - wait, "data_wait_fraction": fraction,
               "steps_per_s": rate(steps, elapsed), "samples_per_s": samples_per_s, "starving": starving,
               "state": "start-up" if steady.steps <= 0 else diagnosis.STARVING if starving else diagnosis.KEEPING_UP,
               "stage": stage}
        line = (f"{self._prefix()}step {self._steps} | data wait {fraction:.1%} | "
                f"{row['steps_per_s']:.1f} steps/s")
        if samples_per_s is not None:
            line += f" | {samples_per_s:,.0f} samples/s"
        if steady.steps <= 0:
            line += " | start-up"
        elif starving:
            line += " | STARVING" + (f": {stage}" if stage else "")
        self._emit(line)
        self._write_row("interval", row)
        if self._tb is not None:
            for key in ("data_wait_fraction", "steps_per_s", "samples_per_s"):
                if row[key] is not None:
                    self._tb.add_scalar(f"stoker/{key}", row[key], self._steps)
        self._last_log = (self._steps, self._wait_s, self._compute_s, self._samples or 0, time.perf_counter(),
                          *self._startup)

    def _prefix(self) -> str:
        return f"[stoker.monitor rank {self._rank}/{self._world}] " if self._world > 1 else "[stoker.monitor] "

    def _emit(self, text: str) -> None:
        log = self.config.log
        if isinstance(log, logging.Logger):
            log.info(text)
        elif log is not None:
            log(text)
        elif _LOGGER.hasHandlers():
            _LOGGER.info(text)
        else:
            # Logging is unconfigured and INFO would vanish; a monitor nobody sees is useless, so use stderr.
            print(text, file=sys.stderr, flush=True)

    def _gather(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        import torch.distributed as dist

        values = rank_rows.gathered_values(local)
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(everyone, mine)
        rows = []
        for rank, tensor in enumerate(everyone):
            rows.append(rank_rows.from_gathered(rank, tensor.cpu().tolist()))
        return rows

    def _write_outputs(self, result: dict[str, Any], local: dict[str, Any]) -> None:
        self._write_row("total", {**local, "stage": local["bottleneck_stage"]})
        if self._tb is not None:
            for key in ("data_wait_fraction", "steady_data_wait_fraction", "steps_per_s", "samples_per_s"):
                if result[key] is not None and not math.isnan(result[key]):
                    self._tb.add_scalar(f"stoker/total/{key}", result[key], self._steps)
            for row in result["ranks"]:
                for stage, ms in row["stage_ms_per_batch"].items():
                    self._tb.add_scalar(f"stoker/rank{row['rank']}/stage_ms_per_batch/{stage}", ms, self._steps)
            self._tb.flush()

    def _save(self, result: dict[str, Any]) -> None:
        if self._json_file is not None:
            with open(self._json_file, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2, default=str, allow_nan=True)
        if self.config.plot is not None and self._rank == 0:
            plot_ranks(result["ranks"], str(self.config.plot), f"stoker.monitor: {result['headline']}")

    def _write_row(self, kind: str, row: Mapping[str, Any]) -> None:
        if self._csv_file is None:
            return
        # Rows are rare (one per log line), so open-append-close keeps no file handle alive between them.
        with open(self._csv_file, "a" if self._csv_started else "w", newline="") as f:
            writer = csv.writer(f)
            if not self._csv_started:
                writer.writerow(_CSV_COLUMNS)
                self._csv_started = True
            extra = {"kind": kind, "rank": self._rank, "unix_time": f"{time.time():.3f}", "step": self._steps}
            writer.writerow([extra[c] if c in extra else _csv_value(row.get(c)) for c in _CSV_COLUMNS])


def _bottleneck(state: str) -> str:
    return {diagnosis.STARVING: "input pipeline", diagnosis.KEEPING_UP: "compute"}.get(state, "not judged")


def _cuda_sync_every(config: MonitorConfig) -> int:
    if config.cuda is False or config.cuda_sync_every == 0:
        return 0
    available = torch.cuda.is_available()
    if config.cuda and not available:
        raise ConfigError("monitor(cuda=True) but torch.cuda.is_available() is False")
    # Auto mode never creates a CUDA context: a CPU-only job on a GPU machine would pay seconds and memory for it.
    if config.cuda is None and not (available and torch.cuda.is_initialized()):
        return 0
    return config.cuda_sync_every


def _distributed_info(config: MonitorConfig) -> tuple[int, int, bool]:
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if config.distributed and not initialized:
        raise ConfigError("monitor(distributed=True) but torch.distributed is not initialized")
    if not initialized:
        return 0, 1, False
    return dist.get_rank(), dist.get_world_size(), config.distributed is not False


def _per_rank_path(path: str | PathLike[str] | None, rank: int) -> str | None:
    if path is None:
        return None
    text = str(path)
    if "{rank}" in text:
        return text.replace("{rank}", str(rank))
    return text if rank == 0 else None  # ranks sharing one file would interleave rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _open_tensorboard(directory: str | PathLike[str] | None) -> Any:
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise MissingExtraError("monitor(tensorboard_dir=...)", "tensorboard", "tensorboard") from exc
    return SummaryWriter(log_dir=str(directory))
