"""`stoker.monitor`: measure, inside a real training loop, how long each step waits for data.

A step is split at the loader boundary: *wait* is the time spent inside `next()` on the loader's iterator, *compute*
is the time from handing the batch out until the loop asks for the next one. The data-wait fraction,
wait / (wait + compute), is the share of wall time the accelerator could not work for lack of input.
"""

from __future__ import annotations

import csv
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
from stoker.perf.stats import RingBuffer, percentiles, rate
from stoker.perf.verdict import advice_for

_LOGGER = logging.getLogger("stoker.monitor")

# Per-rank numbers exchanged with one all_gather of a float64 tensor, in this order.
_GATHERED = ("steps", "samples", "wait_s", "compute_s", "first_batch_s", "step_ms_p50", "wait_ms_p50", "wait_ms_p90")

_CSV_COLUMNS = ("kind", "rank", "unix_time", "step", "steps", "samples", "wait_s", "compute_s",
                "data_wait_fraction", "steps_per_s", "samples_per_s", "starving")

_INPUT_ADVICE = ("The loader is slower than the training step. Run `stoker bench` to find the slow stage, or expose "
                 "`stage_times()` on the loader so this report can name it; more workers is the usual first fix.",)


@dataclass(frozen=True)
class MonitorConfig:
    """Options of `monitor`; every field can also be passed to `monitor(...)` as a keyword."""

    log_every: int = 100  # steps between one-line summaries; 0 turns the step trigger off
    log_every_s: float = 0.0  # seconds between one-line summaries; 0 turns the time trigger off
    log: logging.Logger | Callable[[str], Any] | None = None  # None: the "stoker.monitor" logger
    starve_threshold: float = 0.05  # data-wait fraction above which the loop is "starving"
    window: int = 4096  # recent steps kept for percentiles
    batch_size: int | Callable[[Any], int] | None = None  # None: read it from each batch
    cuda: bool | None = None  # None: sync only if CUDA is available and already initialized
    cuda_sync_every: int = 10  # synchronize CUDA before timing every N-th step; 0 never
    distributed: bool | None = None  # None: aggregate over ranks if torch.distributed is initialized
    csv_path: str | PathLike[str] | None = None  # may contain "{rank}"; otherwise only rank 0 writes
    tensorboard_dir: str | PathLike[str] | None = None  # written by rank 0 only

    def __post_init__(self) -> None:
        if not 0 < self.starve_threshold < 1:
            raise ConfigError(f"starve_threshold must be in (0, 1), got {self.starve_threshold}")
        for name in ("log_every", "cuda_sync_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.log_every_s < 0:
            raise ConfigError(f"log_every_s must be >= 0, got {self.log_every_s}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"window must be an int >= 1, got {self.window!r}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def count_samples(batch: Any) -> int | None:
    """Return the number of samples in `batch`, or None if it cannot tell.

    A tensor or array counts its first dimension; a dict counts its first countable value; a list or tuple whose
    first element is a tensor, array, dict or sequence is read as the fields of one batch (inputs, targets) and
    counted by that element; any other list or tuple counts its length.
    """
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    if isinstance(batch, Mapping):
        for value in batch.values():
            count = count_samples(value)
            if count is not None:
                return count
        return None
    if isinstance(batch, (list, tuple)):
        if batch and (hasattr(batch[0], "shape") or isinstance(batch[0], (Mapping, list, tuple))):
            return count_samples(batch[0])
        return len(batch)
    return None


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
        self._count = _sample_counter(config.batch_size)
        self._rows = RingBuffer(config.window, width=2)  # (wait, compute) seconds of completed steps
        self._steps = 0
        self._samples: int | None = 0  # None once a batch could not be counted
        self._wait_s = 0.0
        self._compute_s = 0.0
        self._first_batch_s = math.nan
        self._it: Any = None
        self._iter_wait = 0.0  # time spent in iter(loader), charged to the next step's wait
        self._pending_wait = 0.0  # wait of the step whose compute is still running
        self._t_out: float | None = None  # when the last batch was handed out; None if no step is running
        self._last_log = (0, 0.0, 0.0, 0, time.perf_counter())  # steps, wait, compute, samples, time
        self._logged_steps = -1  # steps at the last logged report
        self._recorded_steps = -1  # steps at the last "total" row written to CSV / TensorBoard
        self._closed = False
        self._csv_file = _csv_path(config.csv_path, self._rank)
        self._csv_started = False
        self._tb = _open_tensorboard(config.tensorboard_dir) if self._rank == 0 else None

    # ---- iteration: keep the per-step work to two perf_counter() calls and one ring-buffer row ----

    def __iter__(self) -> Monitor:
        # A pass abandoned mid-step (break, then a new for-loop): its last compute is unknown, so drop it rather
        # than charge whatever the user did in between (validation, checkpointing) as compute.
        self._t_out = None
        start = time.perf_counter()
        self._it = iter(self.loader)
        self._iter_wait = time.perf_counter() - start  # e.g. DataLoader starting its workers: the GPU waits
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self.__iter__()
        if self._sync_every and self._steps % self._sync_every == 0:
            # Queued GPU work finishes here, counted as compute, so the wait timed below is pure data wait.
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self._t_out is not None:
            compute = t0 - self._t_out
            self._compute_s += compute
            self._rows.append(self._pending_wait, compute)
        try:
            batch = next(self._it)
        except StopIteration:
            self._wait_s += time.perf_counter() - t0 + self._iter_wait  # loader shutdown: idle, but not a step
            self._iter_wait, self._t_out, self._it = 0.0, None, None
            self.report(aggregate=False)
            raise
        t1 = time.perf_counter()
        wait = t1 - t0 + self._iter_wait
        self._iter_wait = 0.0
        self._wait_s += wait
        self._pending_wait = wait
        self._steps += 1
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
        step_ms = percentiles(rows.sum(axis=1) * 1e3, (50, 90))
        wait_ms = percentiles(rows[:, 0] * 1e3, (50, 90, 100))
        starving = fraction > self.config.starve_threshold
        shares = self._stage_shares()
        stage = max(shares, key=shares.__getitem__) if starving and shares else None
        return {
            "rank": self._rank,
            "world_size": self._world,
            "steps": self._steps,
            "samples": self._samples,
            "elapsed_s": elapsed,
            "wait_s": self._wait_s,
            "compute_s": self._compute_s,
            "data_wait_fraction": fraction,
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
            "starving": starving,
            "bottleneck": "input pipeline" if starving else "compute",
            "bottleneck_stage": stage,
            "stage_shares": shares,
            "advice": list(advice_for(stage) if stage else _INPUT_ADVICE) if starving else [],
        }

    def report(self, *, aggregate: bool = True, log: bool = True) -> dict[str, Any]:
        """Build the report, across ranks when distributed (a collective: call it on every rank), and log it."""
        local = self.metrics()
        everyone = aggregate and self._aggregate
        ranks = self._gather(local) if everyone else [_rank_row(local)]
        slowest = max(ranks, key=lambda r: r["wait_s"] / max(r["steps"], 1))
        fractions = [r["data_wait_fraction"] for r in ranks if not math.isnan(r["data_wait_fraction"])]
        worst = max(fractions, default=math.nan)
        starving = worst > self.config.starve_threshold
        samples = [r["samples_per_s"] for r in ranks]
        result = {
            "scope": "all ranks" if everyone or self._world == 1 else f"rank {self._rank} of {self._world} only",
            "world_size": len(ranks),
            "ranks": ranks,
            # Under DDP every rank runs at the pace of the slowest, which waits in next() while the others
            # wait in all-reduce (counted as their compute): the slowest rank is the one with most data wait.
            "slowest_rank": slowest["rank"],
            "data_wait_fraction": worst,
            "mean_data_wait_fraction": sum(fractions) / len(fractions) if fractions else math.nan,
            "steps_per_s": min(r["steps_per_s"] for r in ranks),
            "samples_per_s": None if any(math.isnan(s) for s in samples) else sum(samples),
            "starving": starving,
            "bottleneck": "input pipeline" if starving else "compute",
            "local": local,
            "tuning": _tuning(self.loader),
        }
        self.last_report = result
        if log and (not everyone or self._rank == 0):  # an all-ranks report is logged once, by rank 0
            self._emit(format_report(result))
            self._logged_steps = self._steps
        if self._steps != self._recorded_steps:  # a pass-end report followed by close() adds no new row
            self._recorded_steps = self._steps
            self._write_row("total", local)
            if self._tb is not None:
                for key in ("data_wait_fraction", "steps_per_s", "samples_per_s"):
                    if result[key] is not None:
                        self._tb.add_scalar(f"stoker/total/{key}", result[key], self._steps)
                self._tb.flush()
        return result

    def close(self, *, aggregate: bool = True) -> dict[str, Any] | None:
        """Finish the running step, report (see `report`) and close the TensorBoard writer; idempotent."""
        if self._closed:
            return self.last_report
        if self._t_out is not None:
            compute = time.perf_counter() - self._t_out
            self._compute_s += compute
            self._rows.append(self._pending_wait, compute)
            self._t_out = None
        # Do not repeat the report a finished pass just logged, unless this one adds the other ranks.
        repeat = self._steps == self._logged_steps and not (aggregate and self._aggregate)
        result = self.last_report if repeat else self.report(aggregate=aggregate)
        if self._tb is not None:
            self._tb.close()
        self._closed = True
        return result

    # ---- helpers ----

    def _log_interval(self) -> None:
        steps0, wait0, compute0, samples0, _ = self._last_log
        steps, wait = self._steps - steps0, self._wait_s - wait0
        elapsed = wait + self._compute_s - compute0
        fraction = wait / elapsed if elapsed > 0 else math.nan
        samples_per_s = None if self._samples is None else rate(self._samples - samples0, elapsed)
        row = {"steps": steps, "samples": None if self._samples is None else self._samples - samples0,
               "wait_s": wait, "compute_s": elapsed - wait, "data_wait_fraction": fraction,
               "steps_per_s": rate(steps, elapsed), "samples_per_s": samples_per_s,
               "starving": fraction > self.config.starve_threshold}
        line = (f"{self._prefix()}step {self._steps} | data wait {fraction:.1%} | "
                f"{row['steps_per_s']:.1f} steps/s")
        if samples_per_s is not None:
            line += f" | {samples_per_s:,.0f} samples/s"
        self._emit(line + (" | STARVING" if row["starving"] else ""))
        self._write_row("interval", row)
        if self._tb is not None:
            for key in ("data_wait_fraction", "steps_per_s", "samples_per_s"):
                if row[key] is not None:
                    self._tb.add_scalar(f"stoker/{key}", row[key], self._steps)
        self._last_log = (self._steps, self._wait_s, self._compute_s, self._samples or 0, time.perf_counter())

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

    def _stage_shares(self) -> dict[str, float]:
        source = getattr(self.loader, "stage_times", None)
        if source is None:
            source = getattr(getattr(self.loader, "dataset", None), "stage_times", None)
        if source is None:
            return {}
        times = source() if callable(source) else source
        total = sum(times.values())
        return {name: seconds / total for name, seconds in times.items()} if total > 0 else {}

    def _gather(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        import torch.distributed as dist

        values = [math.nan if local[key] is None else float(local[key]) for key in _GATHERED]
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(everyone, mine)
        rows = []
        for rank, tensor in enumerate(everyone):
            row = dict(zip(_GATHERED, tensor.cpu().tolist()))
            row["rank"] = rank
            rows.append(_rank_row(row))
        return rows

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


def format_report(report: Mapping[str, Any]) -> str:
    """Render a `Monitor.report()` dict as a few lines of text."""
    local, ranks = report["local"], report["ranks"]
    elapsed = max(r["wait_s"] + r["compute_s"] for r in ranks)
    steps = max(r["steps"] for r in ranks)
    where = f" on {len(ranks)} ranks" if len(ranks) > 1 else ""
    if report["scope"] != "all ranks":
        where = f" ({report['scope']})"
    state = "STARVING" if report["starving"] else "keeping up"
    lines = [f"stoker.monitor report: {steps} steps in {elapsed:.1f} s{where}"]
    wait = f"{report['data_wait_fraction']:.1%} of step time"
    if len(ranks) > 1:
        wait += f" on the slowest rank, mean {report['mean_data_wait_fraction']:.1%}"
    lines.append(f"  data wait    {wait} -> {state} (threshold {local['starve_threshold']:.0%})")
    throughput = f"{report['steps_per_s']:.1f} steps/s"
    if report["samples_per_s"] is not None:
        throughput += f", {report['samples_per_s']:,.0f} samples/s" + (" over all ranks" if len(ranks) > 1 else "")
    if local["samples_per_s_if_fed"] is not None and len(ranks) == 1:
        throughput += f" ({local['samples_per_s_if_fed']:,.0f} if data were free)"
    lines.append(f"  throughput   {throughput}")
    here = f"rank {local['rank']}: " if len(ranks) > 1 else ""
    first = local["first_batch_s"]
    first_text = f"{first:.2f} s" if first >= 1 else f"{first * 1e3:.1f} ms"
    lines.append(f"  step time    {here}p50 {local['step_ms_p50']:.1f} ms; data wait p50 "
                 f"{local['wait_ms_p50']:.1f} ms, p90 {local['wait_ms_p90']:.1f} ms; first batch {first_text}")
    if len(ranks) > 1:
        slow = ranks[report["slowest_rank"]]
        fast = min(ranks, key=lambda r: r["wait_s"] / max(r["steps"], 1))
        lines.append(f"  slowest rank {slow['rank']}: waits {1e3 * slow['wait_s'] / max(slow['steps'], 1):.1f} ms "
                     f"per step for data (least: rank {fast['rank']}, "
                     f"{1e3 * fast['wait_s'] / max(fast['steps'], 1):.1f} ms)")
    bottleneck = report["bottleneck"]
    if local["stage_shares"]:
        shares = sorted(local["stage_shares"].items(), key=lambda kv: -kv[1])
        bottleneck += " (loader time by stage: " + ", ".join(f"{k} {v:.0%}" for k, v in shares) + ")"
    lines.append(f"  bottleneck   {bottleneck}")
    if report["starving"]:
        advice = local["advice"] or list(_INPUT_ADVICE)
        lines.extend(f"  advice       {line}" for line in advice)
    if report.get("tuning") is not None:  # an autotuned stoker.DataLoader: what it chose and why
        lines.extend("  " + line for line in report["tuning"]["summary"].splitlines())
    return "\n".join(lines)


def _tuning(loader: Any) -> dict[str, Any] | None:
    """The loader's `tuning_report()` as a dict with its text under "summary" (stoker.DataLoader with
    num_workers="auto"), else None; a dict, so that the report stays plain data (JSON, CSV, all-ranks)."""
    tuning_report = getattr(loader, "tuning_report", None)
    report = tuning_report() if callable(tuning_report) else None
    return None if report is None else {"summary": str(report), **report.to_dict()}


def _rank_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """Per-rank summary from the gathered numbers (or from local metrics)."""
    row = {key: values[key] for key in _GATHERED}
    row["samples"] = math.nan if row["samples"] is None else row["samples"]
    row["rank"] = int(values["rank"])
    row["steps"] = int(row["steps"])
    elapsed = row["wait_s"] + row["compute_s"]
    row["data_wait_fraction"] = row["wait_s"] / elapsed if elapsed > 0 and row["steps"] else math.nan
    row["steps_per_s"] = rate(row["steps"], elapsed)
    row["samples_per_s"] = rate(row["samples"], elapsed)
    return row


def _sample_counter(batch_size: int | Callable[[Any], int] | None) -> Callable[[Any], int | None]:
    if batch_size is None:
        return count_samples
    if callable(batch_size):
        return batch_size
    return lambda _batch: batch_size


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


def _csv_path(path: str | PathLike[str] | None, rank: int) -> str | None:
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
