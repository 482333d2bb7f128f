"""Small measurement helpers: a preallocated ring buffer, percentiles, rates and a per-stage timer."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from stoker.errors import ConfigError


class RingBuffer:
    """The most recent `capacity` rows of `width` floats, stored in one preallocated numpy array.

    Appending writes one row in place (no allocation), so it is cheap enough to call on every training step.
    """

    def __init__(self, capacity: int, width: int = 1) -> None:
        if capacity < 1 or width < 1:
            raise ConfigError(f"RingBuffer needs capacity >= 1 and width >= 1, got {capacity} and {width}")
        self._data = np.zeros((capacity, width), dtype=np.float64)
        self._capacity = capacity
        self._count = 0  # rows ever appended; the next row goes to _count % capacity

    def append(self, *values: float) -> None:
        """Store one row, overwriting the oldest once the buffer is full."""
        self._data[self._count % self._capacity] = values
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, self._capacity)

    @property
    def total_appended(self) -> int:
        """Rows appended since creation, including those already overwritten."""
        return self._count

    def values(self) -> np.ndarray:
        """Return a copy of the stored rows, oldest first, shape (len(self), width)."""
        if self._count <= self._capacity:
            return self._data[: self._count].copy()
        start = self._count % self._capacity
        return np.concatenate([self._data[start:], self._data[:start]])


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 90, 99)) -> dict[float, float]:
    """Return {q: q-th percentile} of `values`; NaN for each q when there are no values."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {q: float("nan") for q in qs}
    return {q: float(v) for q, v in zip(qs, np.percentile(array, qs))}


def rate(count: float, seconds: float) -> float:
    """Return count / seconds, or NaN when no time has passed (a rate over nothing is unknown, not infinite)."""
    return count / seconds if seconds > 0 else float("nan")


class StageTimer:
    """Accumulates busy seconds and item counts per named stage; a loader can expose `times()` as `stage_times()`.

    Not thread-safe: give each worker its own timer and `merge` them.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._items: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, items: int = 1) -> Iterator[None]:
        """Time the body of a `with` block as `items` items of stage `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, items)

    def add(self, name: str, seconds: float, items: int = 1) -> None:
        """Record `seconds` of work on `items` items for stage `name`."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds
        self._items[name] = self._items.get(name, 0) + items

    def merge(self, other: StageTimer) -> None:
        """Add another timer's totals into this one (e.g. one timer per worker)."""
        for name, seconds in other._seconds.items():
            self.add(name, seconds, other._items[name])

    def times(self) -> dict[str, float]:
        """Return {stage: busy seconds}, in the order stages were first seen."""
        return dict(self._seconds)

    def rates(self) -> dict[str, float]:
        """Return {stage: items per busy second}, i.e. what one lane of each stage sustains."""
        return {name: rate(self._items[name], seconds) for name, seconds in self._seconds.items()}
