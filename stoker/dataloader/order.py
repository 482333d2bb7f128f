"""The sample order of an epoch and how it is dealt to ranks and workers: pure numpy, no state, no I/O.

The global order of epoch `e` depends only on (seed, e, shard rows, shuffle window), never on the world size or
the number of workers:

1. the shards are permuted by (seed, e), giving a *stream* of samples, shard after shard;
2. the stream is cut into windows of `window` samples and each window is permuted by (seed, e, window number).

Position p of the epoch's order is therefore a window-local shuffle of stream position p: reading it needs only the
shards of one window (and the next one, prefetched), which is what makes streaming from object storage cheap.

Dealing: the positions still to deliver, [start, total), are cut into *units* of `block` samples (the batch size,
or 1 when samples are yielded one by one). Unit u goes to rank u % world; the rank's j-th unit goes to worker
j % workers, which is the order in which torch's DataLoader collects batches from its workers. So when every rank
has delivered k units, exactly the positions [start, start + k * world * block) have been delivered: a checkpoint
is one integer, and it can be re-dealt to any world size, worker count or batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stoker.errors import ConfigError
from stoker.options import epoch_rng


def shard_permutation(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which shards are streamed in `epoch` (manifest numbering)."""
    if not shuffle:
        return np.arange(num_shards, dtype=np.int64)
    return epoch_rng(seed, epoch, 0).permutation(num_shards).astype(np.int64)


def window_permutation(length: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """The shuffle of window number `window` (of `length` samples) in `epoch`."""
    return epoch_rng(seed, epoch, 1, window).permutation(length).astype(np.int64)


@dataclass(frozen=True)
class EpochOrder:
    """The global sample order of one epoch; maps order positions to (shard, row)."""

    rows: np.ndarray  # rows per shard, manifest order
    seed: int
    epoch: int
    shuffle: bool
    window: int
    _memo: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    _windows: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"shuffle_buffer must be at least 1 sample, got {self.window}")

    @property
    def total(self) -> int:
        return int(self.stream_offsets[-1])

    @property
    def perm(self) -> np.ndarray:
        """Shards in stream order."""
        if "perm" not in self._memo:
            self._memo["perm"] = shard_permutation(len(self.rows), self.seed, self.epoch, self.shuffle)
        return self._memo["perm"]

    @property
    def stream_offsets(self) -> np.ndarray:
        """First stream position of each shard in stream order, plus the total (length shards + 1)."""
        if "offsets" not in self._memo:
            rows = np.asarray(self.rows, dtype=np.int64)[self.perm]
            self._memo["offsets"] = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        return self._memo["offsets"]

    def window_perm(self, k: int) -> np.ndarray:
        """Permutation of window k's positions (only used when shuffling)."""
        perm = self._windows.get(k)
        if perm is None:
            length = min(self.window, self.total - k * self.window)
            perm = window_permutation(length, self.seed, self.epoch, k)
            windows = [w for w in self._windows if w >= 0]
            if len(windows) >= 4:  # only the current window and the next are ever in use
                del self._windows[min(windows)]
            self._windows[k] = perm
        return perm

    def stream_positions(self, positions: np.ndarray) -> np.ndarray:
        """Stream position of each order position."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle or positions.size == 0:
            return positions
        windows = positions // self.window
        out = np.empty_like(positions)
        for k in np.unique(windows):
            mask = windows == k
            out[mask] = k * self.window + self.window_perm(int(k))[positions[mask] - k * self.window]
        return out

    def locate_stream(self, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of stream positions; shards in manifest numbering."""
        which = np.searchsorted(self.stream_offsets, stream, side="right") - 1
        return self.perm[which], stream - self.stream_offsets[which]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of order positions."""
        return self.locate_stream(self.stream_positions(positions))

    def window_shards(self, k: int, extra: int = 0) -> np.ndarray:
        """Shards that window k reads, in stream order, followed by up to `extra` shards after them."""
        lo, hi = k * self.window, min((k + 1) * self.window, self.total)
        if lo >= hi:
            return self.perm[:0]
        first = int(np.searchsorted(self.stream_offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.stream_offsets, hi - 1, side="right")) - 1
        return self.perm[first:min(last + 1 + extra, len(self.perm))]

    def window_of(self, position: int) -> int:
        return position // self.window

    def shard_stream_end(self) -> np.ndarray:
        """Stream position just past each shard (manifest numbering)."""
        end = np.empty(len(self.rows), dtype=np.int64)
        end[self.perm] = self.stream_offsets[1:]
        return end


def rank_units(remaining: int, block: int, rank: int, world: int, drop_last: bool) -> int:
    """How many units rank `rank` gets from `remaining` positions cut into units of `block`."""
    if drop_last:
        return remaining // (block * world)
    units = -(-remaining // block)
    return max(0, -(-(units - rank) // world))


def rank_samples(remaining: int, block: int, rank: int, world: int, drop_last: bool) -> int:
    """How many samples rank `rank` gets."""
    units = rank_units(remaining, block, rank, world, drop_last)
    if units == 0:
        return 0
    last = (units - 1) * world + rank  # the rank's last global unit
    return (units - 1) * block + min(block, remaining - last * block)


@dataclass(frozen=True)
class Units:
    """The global unit numbers first, first + step, ... (`count` of them): one worker's share of an epoch, as a
    range. Slices are numpy arrays; the whole share is never built, so a plan costs the same at any dataset size."""

    first: int
    step: int
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, stride = index.indices(self.count)
        if stride != 1:
            raise ValueError("Units slices take consecutive units only")
        return self.first + self.step * np.arange(start, max(start, stop), dtype=np.int64)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self[:].astype(dtype or np.int64, copy=False)


@dataclass(frozen=True)
class Deal:
    """Which units of [start, total) one worker of one rank delivers, in delivery order."""

    total: int
    start: int
    block: int
    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1
    drop_last: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.total:
            raise ConfigError(f"resume position {self.start} is outside the epoch of {self.total} samples")
        if self.block < 1 or self.world < 1 or self.workers < 1:
            raise ConfigError(f"block, world and workers must be >= 1, got {self.block}, {self.world}, {self.workers}")
        if not 0 <= self.rank < self.world or not 0 <= self.worker < self.workers:
            raise ConfigError(f"rank {self.rank}/{self.world} or worker {self.worker}/{self.workers} out of range")

    @property
    def remaining(self) -> int:
        return self.total - self.start

    @property
    def rank_units(self) -> int:
        return rank_units(self.remaining, self.block, self.rank, self.world, self.drop_last)

    def units(self) -> Units:
        """Global unit numbers this worker delivers, in order: local unit j (j = worker, worker + workers, ...) is
        global unit j * world + rank."""
        count = max(0, -(-(self.rank_units - self.worker) // self.workers))
        return Units(self.worker * self.world + self.rank, self.workers * self.world, count)

    def positions(self, units: np.ndarray) -> np.ndarray:
        """Order positions of `units`, unit after unit (the last unit of the epoch may be short)."""
        units = np.asarray(units, dtype=np.int64)
        offsets = np.arange(self.block, dtype=np.int64)
        pos = (self.start + units[:, None] * self.block + offsets[None, :]).ravel()
        return pos[pos < self.total]


def consumed(start: int, units_delivered: int, block: int, world: int, total: int) -> int:
    """Order positions delivered over all ranks once every rank has delivered `units_delivered` units."""
    return min(total, start + units_delivered * block * world)
