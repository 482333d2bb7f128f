"""Busy seconds per pipeline stage, counted where the work happens.

Stage names (the keys of `stage_times()` on `stoker.DataLoader`, `StreamingDataset` and `BucketedStream`):

    fetch      waiting on remote storage and on cache fills (another process's fill included)
    read       local shard reads and gathering rows (page-in of mapped shards included)
    decode, augment   stoker's own image transforms, when they report the two apart
    transform  the user's transform / collate_fn, as one stage
    collate    stoker's own batching of rows into the batch structure
    handoff    a worker sending a finished batch to the training process (pickling, moving it to shared memory)
    receive    the training process taking that batch in (unpickling, mapping its shared memory)
    pin        pin_memory in the training process

A clock costs a few `perf_counter` calls per batch (per sample only around a per-sample transform, which costs far
more). A worker keeps its own clock and sends what it added since its last message with each message (`take`); the
training process adds those to the loader's clock, so the totals cover every worker of this process's loader.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

STAGES = ("fetch", "read", "decode", "augment", "transform", "collate", "handoff", "receive", "pin")


class StageClock:
    """Cumulative busy seconds per stage in this process, and what was added since the last `take`."""

    __slots__ = ("_totals", "_taken")

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._taken: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        """Count `seconds` of work in `stage`."""
        self._totals[stage] = self._totals.get(stage, 0.0) + seconds

    def merge(self, times: Mapping[str, float]) -> None:
        """Count every stage of `times` (e.g. deltas a worker sent)."""
        for stage, seconds in times.items():
            self.add(stage, seconds)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Count the time spent in the `with` block in `stage` (exceptions included)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def totals(self) -> dict[str, float]:
        """Seconds per stage since the clock was made, for the stages that ran."""
        return dict(self._totals)

    def take(self) -> dict[str, float]:
        """Seconds per stage added since the last call (what a worker sends with a message)."""
        out = added(self._totals, self._taken)
        self._taken = dict(self._totals)
        return out


def added(now: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Seconds per stage that cumulative times `now` add to an earlier reading `before` (stages that moved only)."""
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}


def sum_times(*parts: Mapping[str, float]) -> dict[str, float]:
    """Stage times of several parts of one pipeline, added stage by stage."""
    out: dict[str, float] = {}
    for times in parts:
        for stage, seconds in times.items():
            out[stage] = out.get(stage, 0.0) + seconds
    return out
