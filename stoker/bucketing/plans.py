"""Pure numpy functions that turn (lengths, seed, epoch, world size) into an epoch of batches.

Nothing here keeps state or touches torch, so every rank computes the same plan from the same
inputs and the samplers stay thin. A plan is kept in CSR form: `order` (sample indices, batch
after batch) plus `starts`/`ends` (batch i is `order[starts[i]:ends[i]]`), so shuffling,
splitting and dealing batches to ranks are array operations, never per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stoker.errors import ConfigError

# Above this many samples the two-pass shuffle below beats numpy's Fisher-Yates (cache misses).
_TWO_PASS_SHUFFLE_MIN = 1 << 16
_SHUFFLE_BUCKETS = 256


@dataclass(frozen=True)
class TokenBudget:
    """A batch may hold rows x round_up(longest, pad_to_multiple_of) <= max_tokens tokens."""

    max_tokens: int
    pad_to_multiple_of: int = 1
    max_batch_size: int | None = None


@dataclass(frozen=True)
class Plan:
    """One epoch of batches for all ranks: batch i is `order[starts[i]:ends[i]]`."""

    order: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    dropped: int = 0  # samples left out by drop_last
    repeated: int = 0  # extra copies added so every rank gets the same number of batches

    @property
    def num_batches(self) -> int:
        return len(self.starts)

    def for_rank(self, rank: int, world: int) -> Plan:
        """The batches rank `rank` of `world` gets: every world-th batch, starting at `rank`."""
        return Plan(self.order, self.starts[rank::world], self.ends[rank::world], self.dropped, self.repeated)


def validate_lengths(lengths: object) -> np.ndarray:
    """Return `lengths` as a 1-D uint32 array, or raise ConfigError naming the first bad entry."""
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ConfigError(f"lengths must be a 1-D array of token counts, got shape {arr.shape}")
    if arr.size == 0:
        raise ConfigError("lengths is empty: there are no samples to batch")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"lengths must hold integers, got dtype {arr.dtype}")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        i = int(bad[0])
        raise ConfigError(
            f"sample {i} has length {int(arr[i])} ({bad.size} samples have length <= 0): "
            "filter out empty documents before batching"
        )
    if int(arr.max()) > np.iinfo(np.uint32).max:
        i = int(np.argmax(arr))
        raise ConfigError(f"sample {i} has length {int(arr[i])}, more than uint32 can hold")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def round_up(values: np.ndarray | int, multiple: int) -> np.ndarray | int:
    """Round up to a multiple of `multiple` (the padded length of a batch)."""
    return -(-values // multiple) * multiple


def random_permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n).

    Large n uses Rao-Sandelius: scatter indices into 256 random buckets (a radix sort on uint8
    keys), then shuffle each bucket, which fits in cache. Same distribution as a Fisher-Yates
    shuffle, about twice as fast on 10M samples.
    """
    if n < _TWO_PASS_SHUFFLE_MIN:
        return rng.permutation(n)
    keys = rng.integers(0, _SHUFFLE_BUCKETS, n, dtype=np.uint8)
    order = np.argsort(keys, kind="stable")
    ends = np.cumsum(np.bincount(keys, minlength=_SHUFFLE_BUCKETS)).tolist()
    start = 0
    for end in ends:
        rng.shuffle(order[start:end])
        start = end
    return order


def descending_keys(lengths: np.ndarray) -> np.ndarray:
    """Sort keys that order samples longest first: (max - length) in the narrowest uint type.

    uint16 keys (every length < 65536) get numpy's radix sort; computed once per lengths array.
    """
    key_dtype = np.uint16 if int(lengths.max()) <= np.iinfo(np.uint16).max else np.uint32
    return (np.iinfo(key_dtype).max - lengths).astype(key_dtype)


def sort_within_megabatches(order: np.ndarray, keys: np.ndarray, megabatch: int) -> np.ndarray:
    """Reorder `order` so each run of `megabatch` samples is sorted by `keys` (see descending_keys).

    Stable sorts only: ties keep their shuffled order, and the result never depends on which
    sorting kernel numpy picks on this CPU (ranks on different hardware must agree).
    """
    ordered_keys = keys[order]
    n = len(order)
    full = (n // megabatch) * megabatch
    out = np.empty_like(order)
    if full:
        rows = np.argsort(ordered_keys[:full].reshape(-1, megabatch), axis=1, kind="stable")
        out[:full] = np.take_along_axis(order[:full].reshape(-1, megabatch), rows, axis=1).ravel()
    if full < n:
        out[full:] = order[full:][np.argsort(ordered_keys[full:], kind="stable")]
    return out


def fixed_size_bounds(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut n samples into batches of `batch_size` (the last one may be short)."""
    starts = np.arange(0, n, batch_size, dtype=np.int64)
    return starts, np.minimum(starts + batch_size, n)


def token_budget_bounds(
    order: np.ndarray, lengths: np.ndarray, megabatch: int, budget: TokenBudget
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy token-budget batches over `order`, sorted longest-first within each megabatch.

    With longest-first order a batch's padded length is that of its first sample, so the batch
    starting at position i holds `max_tokens // padded(lengths[order[i]])` samples (capped by
    `max_batch_size` and by the end of the megabatch). The chain of batch starts is followed for
    all megabatches at once: one vectorised step per batch *within* a megabatch, touching only
    the batch starts, never a step or an array entry per sample.
    """
    n = len(order)
    starts_found = []
    current = np.arange(0, n, megabatch, dtype=np.int64)
    while current.size:
        starts_found.append(current)
        longest = lengths[order[current]].astype(np.int64)
        size = budget.max_tokens // round_up(longest, budget.pad_to_multiple_of)
        if budget.max_batch_size is not None:
            size = np.minimum(size, budget.max_batch_size)
        megabatch_end = np.minimum((current // megabatch + 1) * megabatch, n)
        current = np.minimum(current + size, megabatch_end)
        current = current[current < megabatch_end]  # reaching the end closes that megabatch
    starts = np.sort(np.concatenate(starts_found))
    return starts, np.append(starts[1:], n)


def batch_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Positions in `order` of every sample of the given batches, batch after batch."""
    sizes = ends - starts
    offsets = np.cumsum(sizes) - sizes
    return np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def shuffle_batches(plan: Plan, rng: np.random.Generator) -> Plan:
    """Plan with its batches in random order (the samples inside each batch are untouched)."""
    perm = rng.permutation(plan.num_batches)
    return Plan(plan.order, plan.starts[perm], plan.ends[perm], plan.dropped, plan.repeated)


def _split_into(starts: np.ndarray, ends: np.ndarray, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split batch i into pieces[i] contiguous, near-equal, non-empty parts (kept adjacent)."""
    sizes = ends - starts
    which = np.repeat(np.arange(len(starts)), pieces)
    part = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    base, size, count = starts[which], sizes[which], pieces[which]
    return base + size * part // count, base + size * (part + 1) // count


def equalise_for_ranks(plan: Plan, world: int, drop_last: bool) -> Plan:
    """Make the number of batches a multiple of `world` so every rank gets the same count.

    drop_last: drop the last `B % world` batches (after shuffling, so which ones varies by epoch).
    Otherwise no sample is dropped or repeated: the largest batches are split (in two, unless
    there are very few) until the count divides evenly: at most world - 1 extra batches.
    Only when the epoch has fewer samples than the batch count needs (fewer than about `world`
    more samples than batches) is every batch cut to one sample and the first few samples of
    the epoch repeated (cycling), fewer than `world` copies; `Plan.repeated` says how many.
    """
    num = plan.num_batches
    if num % world == 0:
        return plan
    if drop_last:
        keep = num - num % world
        dropped = int((plan.ends[keep:] - plan.starts[keep:]).sum())
        return Plan(plan.order, plan.starts[:keep], plan.ends[:keep], plan.dropped + dropped, plan.repeated)
    target = -(-num // world) * world
    sizes = plan.ends - plan.starts
    samples = int(sizes.sum())
    if target <= samples:
        pieces = np.ones(num, dtype=np.int64)
        largest_first = np.argsort(-sizes, kind="stable")
        extra = target - num
        while extra > 0:  # one round per extra piece a batch gets; normally a single round
            room = largest_first[sizes[largest_first] > pieces[largest_first]][:extra]
            pieces[room] += 1
            extra -= len(room)
        starts, ends = _split_into(plan.starts, plan.ends, pieces)
        return Plan(plan.order, starts, ends, plan.dropped, plan.repeated)
    # Too few samples to give every rank a batch of its own: one sample per batch, plus repeats.
    flat = plan.order[batch_positions(plan.starts, plan.ends)]
    order = np.resize(flat, -(-samples // world) * world)  # cycles through flat again
    repeats = len(order) - samples
    starts = np.arange(len(order), dtype=np.int64)
    return Plan(order, starts, starts + 1, plan.dropped, plan.repeated + repeats)
