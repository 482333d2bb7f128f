"""Length bucketing for streams: buffer samples, sort the buffer by length, emit batches.

For datasets read front to back (`stoker.StreamingDataset`, any iterable), where no lengths
array exists up front. The trade-off is set by `buffer_size`: a larger buffer finds closer
lengths (less padding) but costs memory and makes consecutive batches come from a longer
stretch of the stream; a small buffer keeps the stream's own order (locality) but pads more.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stoker.bucketing import plans
from stoker.checkpoint import check_checkpoint
from stoker.options import check_seed, epoch_rng, positive_int
from stoker.clock import StageClock, sum_times
from stoker.errors import ConfigError, StateError


STATE_VERSION = 2  # of BucketedStream checkpoints


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
            positive_int(name, value, allow_none=True)
        positive_int("buffer_size", buffer_size)
        positive_int("pad_to_multiple_of", pad_to_multiple_of)
        check_seed(seed)
        if batch_size is not None and max_batch_size is not None:
            raise ConfigError("max_batch_size applies to max_tokens batching; with batch_size it is redundant")
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_batch_size = max_batch_size
        self.seed = seed
        # In shared memory, so that persistent DataLoader workers see `set_epoch` too.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._clock = StageClock()
        self._pending: dict[str, Any] | None = None  # a loaded checkpoint, used by the next iteration
        self._iterator: _BucketIterator | None = None  # the last iteration in this process

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def stage_times(self) -> dict[str, float]:
        """Busy seconds per stage of iterating in this process (in a DataLoader worker: that worker's, which
        stoker.DataLoader collects with each batch): the wrapped dataset's (when it reports them) and this stream's
        bucketing, counted as "collate"."""
        inner = getattr(self.dataset, "stage_times", None)
        return sum_times(inner() if inner is not None else {}, self._clock.totals())

    def set_epoch(self, epoch: int) -> None:
        """Change the batch order for a new epoch; forwarded to the wrapped dataset if it has set_epoch."""
        self._epoch[0] = check_seed(epoch, "epoch")
        self._pending = None
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _config(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "batch_size": self.batch_size, "buffer_size": self.buffer_size,
                "pad_to_multiple_of": self.pad_to_multiple_of, "max_batch_size": self.max_batch_size,
                "seed": self.seed}

    def order_config(self) -> dict[str, Any]:
        """What the batch order depends on: the bucketing settings and, when it has one, the wrapped dataset's
        `order_config()` (saved in checkpoints, which must match it)."""
        inner = getattr(self.dataset, "order_config", None)
        return {**self._config(), "dataset": inner() if inner is not None else None}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of what iterating this stream in this process delivered: the wrapped dataset's position at the
        start of the current buffer, the generator's state there and the batches of that buffer already emitted.
        (Under stoker.DataLoader workers, checkpoint the loader: it collects each worker's iterator state.)"""
        if self._iterator is not None:
            return self._iterator.state_dict()
        if self._pending is not None:
            return self._pending
        return {"version": STATE_VERSION, "config": self._config(), "epoch": self.epoch, "source": None,
                "rng": None, "read": 0, "emitted": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration emit exactly the batches the checkpointed one had not emitted yet."""
        _check_state(state, self._config())
        self.set_epoch(int(state["epoch"]))
        self._pending = state
        self._iterator = None

    def __iter__(self) -> Iterator[list[Any]]:
        iterator = _BucketIterator(self)
        if self._pending is not None:
            iterator.load_state_dict(self._pending)
            self._pending = None
        if get_worker_info() is None:
            self._iterator = iterator  # what `state_dict` reports
        return iterator

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_iterator"] = None  # an iteration of this process (its iterators cannot travel)
        return state

    def _source(self, skip: int) -> tuple[Iterator[Any], Any]:
        """(the wrapped samples after the first `skip` of this worker's share, the wrapped dataset's own iterator
        when it splits itself among workers: it may checkpoint itself)."""
        info = get_worker_info()
        if isinstance(self.dataset, IterableDataset):
            own = iter(self.dataset)
            return (itertools.islice(own, skip, None) if skip else own), own
        if info is None:
            return itertools.islice(iter(self.dataset), skip, None), None
        first = info.id + skip * info.num_workers
        return itertools.islice(iter(self.dataset), first, None, info.num_workers), None

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

    def _batches(self, buffer: list[Any], lengths: list[int], rng: np.random.Generator) -> list[list[Any]]:
        """A full buffer cut into batches of similar lengths, in random order."""
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
        return batches


def _check_state(state: Any, config: dict[str, Any]) -> None:
    check_checkpoint(state, what="BucketedStream", keys={"version", "config", "epoch", "source", "rng", "read",
                                                        "emitted"},
                     version=STATE_VERSION, config=config, settings="the bucketing settings")


class _BucketIterator:
    """One pass of a BucketedStream: fill a buffer, cut it into batches, emit them; remembers where its buffer
    started (the wrapped dataset's state, the generator's state) so that a checkpoint can rebuild it. Inside a
    DataLoader worker it is that worker's pass, and its state that worker's (collected by stoker.DataLoader)."""

    def __init__(self, stream: BucketedStream) -> None:
        info = get_worker_info()
        self.stream = stream
        self.worker = 0 if info is None else info.id
        self.epoch = stream.epoch
        self.rng = epoch_rng(stream.seed, self.epoch, self.worker)
        self.source: Iterator[Any] | None = None
        self.own: Any = None  # the wrapped dataset's iterator, when it can checkpoint itself
        self.resume: dict[str, Any] | None = None
        self.read = 0  # samples read from the wrapped dataset
        self.ready: collections.deque[list[Any]] = collections.deque()
        self.skip = 0  # batches of the first buffer emitted before the checkpoint
        self.emitted = 0  # batches of the current buffer emitted
        self.buffer_state: dict[str, Any] = self._mark(None)
        self.exhausted = False
        self.first_fill = True

    def __iter__(self) -> _BucketIterator:
        return self

    def __next__(self) -> list[Any]:
        if self.source is None:
            self._start()
        while not self.ready:
            if self.exhausted:
                raise StopIteration
            self._fill()
        self.emitted += 1
        return self.ready.popleft()

    def state_dict(self) -> dict[str, Any]:
        """{version, config, epoch, source, rng, read, emitted}: see `BucketedStream.state_dict`."""
        return dict(self.buffer_state, emitted=self.emitted)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before the first batch: emit exactly the batches the pass a `state_dict()` was taken of had not."""
        _check_state(state, self.stream._config())
        if self.source is not None:
            raise StateError("load a BucketedStream iterator's state before its first batch")
        self.resume = state
        self.epoch = int(state["epoch"])
        self.rng = epoch_rng(self.stream.seed, self.epoch, self.worker)
        self.buffer_state = dict(state)

    def _start(self) -> None:
        resume, skip = self.resume, 0
        stream = self.stream
        if resume is not None:
            self.read = int(resume["read"])
            if resume["rng"] is not None:
                self.rng.bit_generator.state = resume["rng"]
            self.skip = int(resume["emitted"])
            if resume["source"] is None:
                skip = self.read
        self.source, own = stream._source(skip)
        self.own = own if callable(getattr(own, "state_dict", None)) else None
        if resume is not None and resume["source"] is not None:
            if self.own is None or not callable(getattr(own, "load_state_dict", None)):
                raise StateError("this BucketedStream checkpoint holds the wrapped dataset's iterator state, but "
                                 f"iterating {type(stream.dataset).__name__} gives an iterator without "
                                 "load_state_dict: resume with the dataset the checkpoint was made with")
            own.load_state_dict(resume["source"])
        self.buffer_state = self._mark(self._source_state())

    def _source_state(self) -> dict[str, Any] | None:
        return self.own.state_dict() if self.own is not None else None

    def _mark(self, source: Any) -> dict[str, Any]:
        # Where the buffer about to be filled starts.
        stream = self.stream
        return {"version": STATE_VERSION, "config": stream._config(), "epoch": self.epoch, "source": source,
                "rng": self.rng.bit_generator.state, "read": self.read, "emitted": 0}

    def _fill(self) -> None:
        stream, source = self.stream, self.source
        assert source is not None
        if not self.first_fill:  # a new buffer starts here (`_start` marked the first one)
            self.buffer_state = self._mark(self._source_state())
        self.first_fill = False
        self.emitted = 0
        buffer: list[Any] = []
        lengths: list[int] = []
        for sample in itertools.islice(source, stream.buffer_size):
            lengths.append(stream._checked_length(sample, self.read))
            buffer.append(sample)
            self.read += 1
        if len(buffer) < stream.buffer_size:
            self.exhausted = True
        if buffer:
            batches = stream._batches(buffer, lengths, self.rng)
            self.ready.extend(batches[self.skip:])
            self.emitted, self.skip = self.skip, 0
