"""Padding and packing metrics: how many of the token slots a model computes on hold real tokens.

Two sources, same numbers: samplers compute `PaddingStats` from lengths alone (no tokens read),
collate functions accumulate a `BatchStats` as they build batches. `length_histogram` and
`render_histogram` give the text histogram `stoker inspect` prints.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from stoker.errors import ConfigError


class _Slots:
    """Efficiency and padding of `real_tokens` out of `total_tokens` slots."""

    real_tokens: int
    total_tokens: int

    @property
    def efficiency(self) -> float:
        """Fraction of slots holding real tokens (packing efficiency); 1.0 when there are none."""
        return self.real_tokens / self.total_tokens if self.total_tokens else 1.0

    @property
    def padding_fraction(self) -> float:
        """Fraction of slots that are padding."""
        return 1.0 - self.efficiency


@dataclass(frozen=True)
class PaddingStats(_Slots):
    """Token slots of a set of batches: `total_tokens` = sum of rows x padded length per batch."""

    batches: int
    rows: int
    real_tokens: int
    total_tokens: int
    shapes: Mapping[tuple[int, int], int] = field(default_factory=dict, compare=False)


def padding_stats(lengths: np.ndarray, offsets: np.ndarray, pad_to_multiple_of: int = 1) -> PaddingStats:
    """Stats of batches given as CSR: batch i holds `lengths[offsets[i]:offsets[i + 1]]`.

    A batch is padded to its longest sample rounded up to `pad_to_multiple_of`, as `pad_collate` does.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    rows = np.diff(offsets)
    if len(rows) == 0:
        return PaddingStats(0, 0, 0, 0, {})
    if (rows <= 0).any():
        raise ConfigError(f"batch {int(np.flatnonzero(rows <= 0)[0])} is empty: offsets must increase")
    longest = np.maximum.reduceat(lengths, offsets[:-1])
    padded = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    shapes, counts = np.unique(np.stack([rows, padded], axis=1), axis=0, return_counts=True)
    return PaddingStats(
        batches=len(rows),
        rows=int(rows.sum()),
        real_tokens=int(lengths.sum()),
        total_tokens=int((rows * padded).sum()),
        shapes={(int(b), int(t)): int(c) for (b, t), c in zip(shapes, counts)},
    )


class BatchStats(_Slots):
    """Running totals over the batches a collate function built (or `update` was given).

    Counters live in the process that builds the batches: with DataLoader workers, call
    `update(batch)` on the batches the training loop receives to get totals in the main process.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero the counters and restart the clock used by `tokens_per_second`."""
        self.batches = 0
        self.rows = 0
        self.real_tokens = 0
        self.total_tokens = 0
        self.shapes: Counter[tuple[int, int]] = Counter()
        self.started = time.perf_counter()

    def add(self, rows: int, row_length: int, real_tokens: int) -> None:
        """Record one batch of `rows` x `row_length` slots holding `real_tokens` real tokens."""
        self.batches += 1
        self.rows += rows
        self.real_tokens += real_tokens
        self.total_tokens += rows * row_length
        self.shapes[(rows, row_length)] += 1

    def update(self, batch: Mapping) -> None:
        """Record a batch produced by `pad_collate` or `pack_collate` (uses its attention_mask)."""
        mask = batch["attention_mask"]
        rows, row_length = (int(d) for d in mask.shape)
        self.add(rows, row_length, int(mask.sum()))

    def tokens_per_second(self) -> float:
        """Real tokens recorded per second of wall time since creation or `reset()`."""
        elapsed = time.perf_counter() - self.started
        return self.real_tokens / elapsed if elapsed > 0 else 0.0

    def as_padding_stats(self) -> PaddingStats:
        """A frozen snapshot of the totals."""
        return PaddingStats(self.batches, self.rows, self.real_tokens, self.total_tokens, dict(self.shapes))


@dataclass(frozen=True)
class Histogram:
    """Counts of lengths in integer bins: bin i covers `edges[i] <= length < edges[i + 1]`."""

    counts: np.ndarray
    edges: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def length_histogram(lengths: np.ndarray, bins: int = 20) -> Histogram:
    """Histogram of sample lengths in at most `bins` equal-width integer bins."""
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return Histogram(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    low, high = int(lengths.min()), int(lengths.max()) + 1
    # Integer edges, so every bin label is an exact range of lengths.
    edges = np.unique(np.linspace(low, high, bins + 1).round().astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return Histogram(counts.astype(np.int64), edges)


def render_histogram(histogram: Histogram, width: int = 40) -> list[str]:
    """Text lines `low-high  count  percent  bar`, one per bin, for terminal output."""
    if histogram.total == 0:
        return ["(no samples)"]
    peak = int(histogram.counts.max())
    label_width = len(str(int(histogram.edges[-1]) - 1))
    lines = []
    for count, low, high in zip(histogram.counts.tolist(), histogram.edges[:-1].tolist(), histogram.edges[1:].tolist()):
        bar = "#" * round(width * count / peak)
        share = 100.0 * count / histogram.total
        lines.append(f"{low:>{label_width}}-{high - 1:<{label_width}} {count:>9} {share:5.1f}% {bar}")
    return lines
