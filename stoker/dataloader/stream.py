"""StreamingDataset: the shards of a packed dataset as a torch IterableDataset, sharded over ranks and workers.

Each worker computes its share of the epoch's order (`order.py`), reads the shards of the current shuffle window
(prefetching the next ones), and gathers its rows straight from the mapped record batches: the stages of
`stages.py`, composed here. Epoch and resume position live in a tiny shared-memory tensor (`state.StreamPosition`),
so `set_epoch` and `load_state_dict` reach persistent workers too. `batches(plan)` is the same dataset as whole
batches, what stoker.DataLoader's workers iterate.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stoker import cache, shm, storage
from stoker.dataloader import order, remote
from stoker.dataloader import workers
from stoker.clock import StageClock
from stoker.dataloader.reader import ReadOptions, ShardSource
from stoker.dataloader.stages import Batches, Bundler, Progress, RowReader, Samples, progress_state
from stoker.checkpoint import check_checkpoint
from stoker.dataloader.state import STATE_VERSION, StreamPosition, read_state, stream_config
from stoker.errors import ConfigError, StateError
from stoker.formats import integrity
from stoker.options import check_seed, positive_int
from stoker.formats.manifest import Manifest
from stoker.formats.schema import schema_for


def load_manifest(source: str, storage_options: dict[str, Any] | None, read: ReadOptions) -> Manifest:
    """The dataset's manifest; remote reads get the same timeouts and retries as shards."""
    if storage.is_local(source):
        return Manifest.load(source)
    options = storage.remote_options(source, storage_options, connect_timeout=read.connect_timeout,
                                     read_timeout=read.read_timeout)
    # Through the client that reads the shards where it can (obstore: no s3fs/botocore import on the way in).
    reader = remote.manifest_reader(source, storage_options, connect_timeout=read.connect_timeout,
                                    read_timeout=read.read_timeout)
    return cache.retry(lambda: Manifest.load(source, options, read=reader), attempts=read.attempts,
                       backoff=read.backoff,
                       deadline=time.monotonic() + read.shard_timeout,
                       what=f"reading the manifest of {storage.redact(source)}")


def column_kinds(manifest: Manifest) -> dict[str, str]:
    """Column name -> "string", "binary", "list" or "fixed", from the manifest's schema (the per-sample checksum
    is the reader's business, not a column of the samples)."""
    kinds = {}
    for name, arrow_type in manifest.schema.items():
        if name == integrity.COLUMN:
            continue
        if arrow_type == "string":
            kinds[name] = "string"
        elif arrow_type == "binary":
            kinds[name] = "binary"
        elif arrow_type.startswith("list"):
            kinds[name] = "list"
        else:
            kinds[name] = "fixed"
    return kinds


def ordered_columns(manifest: Manifest, columns: Sequence[str] | None) -> tuple[str, ...]:
    """The requested columns (all by default) in the shard schema's order; unknown names are a ConfigError."""
    kinds = column_kinds(manifest)
    if columns is not None:
        unknown = [c for c in columns if c not in kinds]
        if unknown or not columns:
            raise ConfigError(f"columns {unknown or list(columns)} not available; this dataset has {list(kinds)}")
    schema = schema_for(manifest.kind, np.dtype(manifest.token_dtype or "uint32")).names
    wanted = list(columns) if columns is not None else list(kinds)
    return tuple(sorted(wanted, key=lambda c: (schema.index(c) if c in schema else len(schema), c)))


class StreamingDataset(IterableDataset):
    """Samples of a packed dataset (local or remote), shuffled by (seed, epoch) and split over ranks and workers.

    Yields dicts: key, label, image (bytes), height, width for images; key, tokens (numpy), length for text.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 16384,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        cache_limit: int = 16 << 30,
        columns: Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        drop_last: bool = False,
        read: ReadOptions | None = None,
    ) -> None:
        self.source = os.fspath(source)
        self.read = read or ReadOptions()
        self.storage_options = storage_options
        self.manifest = load_manifest(self.source, storage_options, self.read)
        if self.read.checksums:
            integrity.warn_unchecked(self.manifest.schema, storage.redact(self.source))
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        if shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be at least 1 sample, got {shuffle_buffer}")
        self.shuffle_buffer = int(shuffle_buffer)
        self.kinds = column_kinds(self.manifest)
        self.columns = ordered_columns(self.manifest, columns)
        self.transform = transform
        self.drop_last = bool(drop_last)
        self.cache_dir = cache_dir
        self.cache_limit = int(cache_limit)
        if not storage.is_local(self.source):
            self._check_cache_limit()
        self.shard_rows = np.array([s.rows for s in self.manifest.shards], dtype=np.int64)
        self.position = StreamPosition()
        self._topology: tuple[int, int] | None = None  # captured when pickled for spawned workers
        self._progress: Progress | None = None
        self._resources: ProcessResources | None = None
        self._clock = StageClock()  # iterations in this process (stoker.DataLoader's views count on its own)
        self.skipped = 0  # damaged samples left out when iterated in this process (ReadOptions(on_error="skip"))

    def _check_cache_limit(self) -> None:
        rows = [s.rows for s in self.manifest.shards if s.rows]
        if not rows:
            return
        shards = math.ceil(self.shuffle_buffer / min(rows)) + 2 + self.read.prefetch_shards
        need = min(shards, len(self.manifest.shards)) * max(s.bytes for s in self.manifest.shards)
        if self.cache_limit < need:
            raise ConfigError(
                f"cache_limit={self.cache_limit} bytes is below the {need} bytes that one shuffle window of "
                f"{self.shuffle_buffer} samples plus {self.read.prefetch_shards} prefetched shards can span; "
                "raise cache_limit or lower shuffle_buffer"
            )

    # -- epoch, length, checkpoints --------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch`; a pending resume position is kept only if the epoch does not change."""
        self.position.set_epoch(check_seed(epoch, "epoch"))

    def order_config(self) -> dict[str, Any]:
        """What the sample order depends on (saved in checkpoints, which must match it)."""
        return stream_config(self.manifest, seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer)

    def stage_times(self) -> dict[str, float]:
        """Busy seconds per stage (`clock.STAGES`) of iterating this dataset in this process; inside a DataLoader
        worker, that worker's (what a wrapper such as BucketedStream sends on to stoker.DataLoader)."""
        if get_worker_info() is None:
            return self._clock.totals()
        resources = self._resources
        return resources.clock.totals() if resources is not None and resources.pid == os.getpid() else {}

    def __len__(self) -> int:
        """Samples this rank gets in the current epoch (all of them when not distributed)."""
        rank, world = self._topology or workers.topology()
        remaining = self.manifest.num_samples - self.position.start
        return order.rank_samples(remaining, 1, rank, world, self.drop_last)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of what iterating this dataset in this process delivered (with workers, checkpoint the loader)."""
        total = self.manifest.num_samples
        return progress_state(self.order_config(), self._progress, self.epoch, self.position.start, total)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next iteration delivers exactly what it had not delivered."""
        epoch, consumed = read_state(state, self.order_config())
        self.position.resume_at(epoch, consumed)
        self._progress = None

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        iterator = _SampleIterator(self)
        if get_worker_info() is None:
            self._progress = iterator.progress  # what `state_dict` reports
        return iterator

    def batches(self, plan: BatchPlan, clock: StageClock | None = None) -> BatchStream:
        """This dataset as whole batches (what stoker.DataLoader's workers iterate), sharing its epoch and resume
        position; stage seconds count on `clock` (in workers: on theirs, sent with each message)."""
        return BatchStream(self, plan, clock if clock is not None else StageClock())

    def process_resources(self) -> ProcessResources:
        """This process's shard source, slab pool and worker clock, made on first use in each process (persistent
        workers keep their cache handles, slabs and unsent stage seconds across epochs)."""
        if self._resources is None or self._resources.pid != os.getpid():
            if _remote_worker(self):
                workers.limit_heap_arenas()  # before the download threads start
            source = ShardSource(self.source, self.manifest, self.storage_options, self.cache_dir, self.cache_limit,
                                 self.read)
            self._resources = ProcessResources(os.getpid(), source, shm.SlabPool(max_slabs=8), StageClock())
        return self._resources

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_resources"] = None
        state["_progress"] = None
        if state["_topology"] is None and get_worker_info() is None:
            # Pickled for spawn/forkserver workers: they cannot see the process group, so take it along.
            state["_topology"] = workers.topology()
        return state


@dataclass
class ProcessResources:
    """What one process needs to read a dataset: made there, never pickled."""

    pid: int
    source: ShardSource
    pool: shm.SlabPool
    clock: StageClock  # a worker's stage seconds not sent yet


@dataclass(frozen=True)
class BatchPlan:
    """How `StreamingDataset.batches` cuts and delivers batches."""

    batch_size: int
    drop_last: bool = False  # on top of the dataset's own drop_last
    collate_fn: Callable[[list[Any]], Any] | None = None  # None: stoker's columnar collate (or default_collate)
    topology: tuple[int, int] = (0, 1)  # (rank, world size) of the training process
    persistent: bool = False  # workers outlive the epoch: worth fetching the next epoch's first shards
    bundle: int = 1  # batches per message from a worker (see `workers.Bundle`)

    def __post_init__(self) -> None:
        for name in ("batch_size", "bundle"):
            positive_int(f"BatchPlan.{name}", getattr(self, name))


class BatchStream(IterableDataset):
    """A StreamingDataset as batches (`StreamingDataset.batches`): in a worker, `workers.Bundle` messages of them."""

    def __init__(self, dataset: StreamingDataset, plan: BatchPlan, clock: StageClock) -> None:
        self.dataset, self.plan, self.clock = dataset, plan, clock

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self)


def _remote_worker(ds: StreamingDataset) -> bool:
    """Whether this is a DataLoader worker reading a remote dataset (whose download threads need the heap kept in
    check: `workers.limit_heap_arenas`, `workers.trim_heap`)."""
    return get_worker_info() is not None and not storage.is_local(ds.source)


class _SampleIterator:
    """One epoch of a StreamingDataset's samples in this process: RowReader -> Samples, built on the first next().

    Its `state_dict()` is this reader's own progress (its share of the epoch, dealt to this rank and worker), so a
    wrapper that iterates the dataset inside DataLoader workers (`BucketedStream`) checkpoints each worker's share."""

    def __init__(self, ds: StreamingDataset) -> None:
        self.ds = ds
        self.epoch, self.start = ds.epoch, ds.position.start
        self.topology = ds._topology or workers.topology()
        self.progress = Progress(self.epoch, self.start, 1, self.topology[1])
        info = get_worker_info()
        self.in_worker = info is not None
        self.deal = [*self.topology, *((info.id, info.num_workers) if info is not None else (0, 1))]
        self.samples: Samples | None = None
        self.resume: dict[str, Any] | None = None  # a loaded state, applied when the stages are built
        self._config: dict[str, Any] | None = None  # the dataset's order_config (hashing the shard list), once

    def __iter__(self) -> _SampleIterator:
        return self

    def __next__(self) -> Any:
        if self.samples is None:
            ds = self.ds
            clock = ds.process_resources().clock if self.in_worker else ds._clock
            reader = RowReader(ds, self.epoch, self.start, 1, ds.drop_last, self.topology, clock)
            self.samples = Samples(reader, ds.transform, clock)
            if self.resume is not None:
                self.samples.load_state_dict(self.resume)
        try:
            sample = next(self.samples)
        except StopIteration:
            self.progress.done = True
            if _remote_worker(self.ds):
                workers.trim_heap()  # what the epoch's downloads freed
            raise
        finally:
            if not self.in_worker:
                self.ds.skipped += self.samples.reader.take_skipped()
        self.progress.delivered = self.samples.position  # skipped samples count as delivered: resume skips them
        return sample

    def state_dict(self) -> dict[str, Any]:
        """{version, config, deal, samples}: this reader's share ([rank, world, worker, workers]) and the samples of
        it delivered; a fresh iterator of the same dataset, rank and worker continues there (`load_state_dict`)."""
        if self.samples is not None:
            samples = self.samples.state_dict()
        elif self.resume is not None:
            samples = self.resume
        else:
            samples = {"reader": {"epoch": self.epoch, "start": self.start, "next": 0}}
        return {"version": STATE_VERSION, "config": self.config(), "deal": list(self.deal), "samples": samples}

    def config(self) -> dict[str, Any]:
        """The dataset's `order_config()`, computed once per pass (a wrapper asks at every buffer it fills)."""
        if self._config is None:
            self._config = self.ds.order_config()
        return self._config

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before the first sample: deliver the rest of the share a `state_dict()` was taken of."""
        check_checkpoint(state, what="StreamingDataset iterator", keys={"version", "config", "deal", "samples"},
                         version=STATE_VERSION, config=self.config(), settings="the dataset and shuffle settings")
        if self.samples is not None:
            raise StateError("load the iterator's state before its first sample")
        if list(state["deal"]) != self.deal:
            raise StateError(f"this iterator state is of rank {state['deal'][0]} of {state['deal'][1]}, worker "
                             f"{state['deal'][2]} of {state['deal'][3]}, but this iterator is rank {self.deal[0]} of "
                             f"{self.deal[1]}, worker {self.deal[2]} of {self.deal[3]}: resume with the same world "
                             "size and number of DataLoader workers")
        reader = state["samples"]["reader"]
        self.epoch, self.start = int(reader["epoch"]), int(reader["start"])
        # The same Progress object: the dataset reports it (`StreamingDataset.state_dict`) when iterated here.
        self.progress.epoch, self.progress.start, self.progress.delivered = self.epoch, self.start, int(reader["next"])
        self.resume = state["samples"]


class _BatchIterator:
    """One epoch of a BatchStream: RowReader -> Batches -> Bundler, built on the first next()."""

    def __init__(self, stream: BatchStream) -> None:
        ds = stream.dataset
        self.stream = stream
        self.epoch, self.start = ds.epoch, ds.position.start
        self.bundler: Bundler | None = None

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Any:
        if self.bundler is None:
            ds, plan = self.stream.dataset, self.stream.plan
            in_worker = get_worker_info() is not None
            # A worker counts on its own clock and sends what it added with each message; this process counts on
            # the stream's.
            clock = ds.process_resources().clock if in_worker else self.stream.clock
            reader = RowReader(ds, self.epoch, self.start, plan.batch_size, ds.drop_last or plan.drop_last,
                               plan.topology, clock, plan.persistent)
            self.bundler = Bundler(Batches(reader, plan, clock, in_worker), clock)
        try:
            return next(self.bundler)
        except StopIteration:
            if _remote_worker(self.stream.dataset):
                workers.trim_heap()  # what the epoch's downloads freed
            raise
