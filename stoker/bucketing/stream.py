"""Length bucketing for streams: buffer samples, sort the buffer by length, emit batches.

For datasets read front to back (`stoker.StreamingDataset`, any iterable), where no lengths
array exists up front. The trade-off is set by `buffer_size`: a larger buffer finds closer
lengths (less padding) but costs memory and makes consecutive batches come from a longer
stretch of the stream; a small buffer keeps the stream's own order (locality) but pads more.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stoker.bucketing import order as plans
from stoker.dataloader.clock import StageClock, sum_times
from stoker.errors import ConfigError


def _sample_length(sample: Any, position: int) -> int:
    tokens = sample["tokens"] if isinstance(sample, Mapping) else sample
    length = len(tokens)
    if isinstance(sample, Mapping) and "length" in sample and int(sample["length"]) != length:
        raise ConfigError(f"stream sample {position}: 'length' is {int(sample['length'])} but it holds {length} tokens")
    if length == 0:
        raise ConfigError(f"stream sample {position} has no tokens: filter out empty documents first")
    return length


class BucketedStream(IterableDataset):
    """Wrap an iterable of samples; yield lists of samples of similar length.

    Exactly one of `max_tokens` (token-budget batches: rows x padded length <= max_tokens) or
    `batch_size` (fixed-size batches) is required. Every `buffer_size` samples are sorted by
    length, cut into batches, and emitted in random order, then the buffer refills; the last
    partial buffer is flushed the same way. So each sample of the underlying stream is emitted
    exactly once, in exactly one batch.

    Use with `DataLoader(stream, batch_size=None, collate_fn=pad_collate(...))`. Splitting among
    DataLoader workers and ranks is the wrapped dataset's job if it is an `IterableDataset`
    (as StreamingDataset is); any other iterable is split round-robin among workers here, and
    not among ranks.
    """

    def __init__(
        self,
        dataset: Iterable[Any],
        *,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        buffer_size: int = 4096,
        pad_to_multiple_of: int = 8,
        max_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if (max_tokens is None) == (batch_size is None):
            raise ConfigError("give exactly one of max_tokens (token-budget batches) or batch_size (fixed size)")
        for name, value in [("max_tokens", max_tokens), ("batch_size", batch_size), ("max_batch_size", max_batch_size)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in [("buffer_size", buffer_size), ("pad_to_multiple_of", pad_to_multiple_of)]:
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if batch_size is not None and max_batch_size is not None:
            raise ConfigError("max_batch_size applies to max_tokens batching; with batch_size it is redundant")
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.epoch = 0
        self._clock = StageClock()

    def stage_times(self) -> dict[str, float]:
        """Busy seconds per stage of iterating in this process: the wrapped dataset's (when it reports them) and
        this stream's bucketing, counted as "collate"."""
        inner = getattr(self.dataset, "stage_times", None)
        return sum_times(inner() if inner is not None else {}, self._clock.totals())

    def set_epoch(self, epoch: int) -> None:
        """Change the batch order for a new epoch; forwarded to the wrapped dataset if it has set_epoch."""
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _source(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None or isinstance(self.dataset, IterableDataset):
            return iter(self.dataset)
        return itertools.islice(iter(self.dataset), info.id, None, info.num_workers)

    def __iter__(self) -> Iterator[list[Any]]:
        info = get_worker_info()
        rng = plans.epoch_rng(self.seed, self.epoch, 0 if info is None else info.id)
        buffer: list[Any] = []
        lengths: list[int] = []
        for position, sample in enumerate(self._source()):
            lengths.append(self._checked_length(sample, position))
            buffer.append(sample)
            if len(buffer) == self.buffer_size:
                yield from self._flush(buffer, lengths, rng)
                buffer, lengths = [], []
        if buffer:
            yield from self._flush(buffer, lengths, rng)

    def _checked_length(self, sample: Any, position: int) -> int:
        length = _sample_length(sample, position)
        if self.max_tokens is not None:
            padded = plans.round_up(length, self.pad_to_multiple_of)
            if padded > self.max_tokens:
                raise ConfigError(
                    f"stream sample {position} has length {length} (padded to {padded}), more than "
                    f"max_tokens={self.max_tokens}: raise max_tokens or truncate long samples"
                )
        return length

    def _flush(self, buffer: list[Any], lengths: list[int], rng: np.random.Generator) -> Iterator[list[Any]]:
        start = time.perf_counter()
        array = np.asarray(lengths, dtype=np.uint32)
        # Shuffle before the (stable) sort so equal lengths do not keep stream order.
        order = plans.sort_within_megabatches(rng.permutation(len(buffer)), plans.descending_keys(array), len(buffer))
        if self.max_tokens is not None:
            budget = plans.TokenBudget(self.max_tokens, self.pad_to_multiple_of, self.max_batch_size)
            starts, ends = plans.token_budget_bounds(order, array, len(buffer), budget)
        else:
            starts, ends = plans.fixed_size_bounds(len(buffer), self.batch_size)
        batches = [[buffer[i] for i in order[starts[b] : ends[b]].tolist()] for b in rng.permutation(len(starts))]
        self._clock.add("collate", time.perf_counter() - start)
        yield from batches
