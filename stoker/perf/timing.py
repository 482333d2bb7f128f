"""Timing a unit of work: a stage to time, what it sustained, and how many cores this process may use.

`time_stage` repeats the measurement in rounds until the last rounds agree (or the time budget is spent) and
reports the median with the spread, so one disturbed round cannot decide a verdict and a noisy run says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stoker.options import cpu_cores

ROUNDS = 3  # rounds that must agree before a rate is called stable
STABLE_SPREAD = 0.10  # (max - min) / median of the last ROUNDS rounds at or below this: stable
MAX_ROUNDS = 9  # rounds tried before giving up and reporting the spread


def usable_cores() -> int:
    """CPU cores this process may run on (`stoker.options.cpu_cores`, the one core counter)."""
    return cpu_cores()


@dataclass(frozen=True)
class Stage:
    """One stage to time: `step()` does one unit of work and returns (items, bytes) it processed.

    `lanes` is how many copies run in parallel in the real pipeline (one per loader worker); the measured rate of
    one copy is multiplied by it.
    """

    name: str
    step: Callable[[], tuple[int, int]]
    lanes: int = 1
    note: str = ""


@dataclass(frozen=True)
class StageResult:
    """What one stage sustained; `rate` is None when the stage could not be measured (see `note`)."""

    name: str
    rate: float | None  # items/s with all lanes: the median round
    per_lane: float | None  # items/s of one lane (one core)
    lanes: int = 1
    bytes_per_s: float | None = None
    items: int = 0
    seconds: float = 0.0
    note: str = ""
    reference: bool = False  # a speed-of-light figure shown for comparison, not a stage of the pipeline
    spread: float | None = None  # (max - min) / median of the rounds kept; None with one round
    rounds: int = 1
    stable: bool = True  # the rounds agreed within STABLE_SPREAD
    busy: float | None = None  # end-to-end stages: share of the time its workers were busy in stage work

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate, "per_lane": self.per_lane, "lanes": self.lanes,
                "mb_per_s": None if self.bytes_per_s is None else self.bytes_per_s / 1e6, "items": self.items,
                "seconds": self.seconds, "note": self.note, "reference": self.reference,
                "available": self.rate is not None, "spread": self.spread, "rounds": self.rounds,
                "stable": self.stable, "busy": self.busy}


def unavailable(name: str, reason: str) -> StageResult:
    """A stage that could not be measured, with the reason shown in its place."""
    return StageResult(name, None, None, note=f"unavailable: {reason}")


def spread(rates: list[float]) -> float:
    """(max - min) / median of `rates`: 0 for identical rounds; inf when the median is 0."""
    middle = statistics.median(rates)
    return (max(rates) - min(rates)) / middle if middle > 0 else float("inf")


def _one_round(stage: Stage, seconds: float) -> tuple[int, int, float]:
    items = nbytes = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds or items == 0:
        done, size = stage.step()
        items, nbytes = items + done, nbytes + size
        elapsed = time.perf_counter() - start
        if elapsed > 10 * seconds + 30:  # a stage that yields nothing must not hang the bench
            break
    return items, nbytes, elapsed


def time_stage(stage: Stage, seconds: float, *, rounds: int = ROUNDS) -> StageResult:
    """Time `stage.step()` in rounds of `seconds / rounds` until the last `rounds` agree within STABLE_SPREAD
    (or MAX_ROUNDS were run) and return the median round's rate with the spread of the last `rounds`."""
    rates: list[float] = []
    items = nbytes = 0
    elapsed = 0.0
    try:
        while True:
            done, size, took = _one_round(stage, seconds / rounds)
            items, nbytes, elapsed = items + done, nbytes + size, elapsed + took
            rates.append(done / max(took, 1e-9))
            last = rates[-rounds:]
            if len(rates) >= max(rounds, 1) and (spread(last) <= STABLE_SPREAD or len(rates) >= MAX_ROUNDS):
                break
    except Exception as exc:  # noqa: BLE001 - each stage reports its own failure; the others still run
        return unavailable(stage.name, f"{type(exc).__name__}: {exc}")
    last = rates[-rounds:]
    per_lane = statistics.median(last)
    scatter = spread(last) if len(last) > 1 else None
    stable = scatter is None or scatter <= STABLE_SPREAD
    note = stage.note
    if not stable:
        note += f"{'; ' if note else ''}noisy: rounds differ by {scatter:.0%} (median shown)"
    return StageResult(stage.name, per_lane * stage.lanes, per_lane, stage.lanes,
                       nbytes / max(elapsed, 1e-9) * stage.lanes if nbytes else None, items, elapsed, note,
                       spread=scatter, rounds=len(rates), stable=stable)
