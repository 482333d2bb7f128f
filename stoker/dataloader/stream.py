"""StreamingDataset: the shards of a packed dataset as a torch IterableDataset, sharded over ranks and workers.

Each worker computes its share of the epoch's order (`order.py`), reads the shards of the current shuffle window
(prefetching the next ones), and gathers its rows straight from the mapped record batches. Epoch and resume
position live in a tiny shared-memory tensor, so `set_epoch` and `load_state_dict` reach persistent workers too.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stoker import cache, storage
from stoker.dataloader import order
from stoker.dataloader import workers
from stoker.dataloader.reader import (
    Catalog, MappedRows, OpenShard, RaggedPlan, ReadOptions, ShardSource, decode_strings, to_samples,
)
from stoker.dataloader.state import make_state, read_state, stream_config
from stoker.errors import ConfigError
from stoker.formats import integrity
from stoker.formats.manifest import Manifest
from stoker.formats.schema import schema_for

SAMPLE_GROUP = 256  # samples gathered at once when yielding samples one by one


def load_manifest(source: str, storage_options: dict[str, Any] | None, read: ReadOptions) -> Manifest:
    """The dataset's manifest; remote reads get the same timeouts and retries as shards."""
    if storage.is_local(source):
        return Manifest.load(source)
    options = storage.remote_options(source, storage_options, connect_timeout=read.connect_timeout,
                                     read_timeout=read.read_timeout)
    return cache.retry(lambda: Manifest.load(source, options), attempts=read.attempts, backoff=read.backoff,
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


@dataclass
class Progress:
    """What an iterator in this process has delivered: units of `block` samples since position `start`."""

    epoch: int
    start: int
    block: int
    world: int
    delivered: int = 0
    done: bool = False


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
        self.read.check()
        self.storage_options = storage_options
        self.manifest = load_manifest(self.source, storage_options, self.read)
        if self.read.checksums:
            integrity.warn_unchecked(self.manifest.schema, storage.redact(self.source))
        self.shuffle = bool(shuffle)
        self.seed = order.check_seed(seed)
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
        self._rows = np.array([s.rows for s in self.manifest.shards], dtype=np.int64)
        self._control = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, resume position]
        self._topology: tuple[int, int] | None = None  # set by stoker.DataLoader, or captured when pickled
        self._block = 1
        self._collate: Callable[[list[Any]], Any] | None = None
        self._batched = False
        self._bundle = 1  # batches per message from a worker (see `workers.Bundle`)
        self._persistent = False  # workers outlive the epoch: worth fetching the next epoch's first shards
        self._progress: Progress | None = None
        self._source: tuple[int, ShardSource, workers.SlabPool] | None = None

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
        return int(self._control[0])

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch`; a pending resume position is kept only if the epoch does not change."""
        epoch = order.check_seed(epoch, "epoch")
        if epoch != self.epoch:
            self._control[0], self._control[1] = epoch, 0

    def _resume_at(self, epoch: int, position: int) -> None:
        self._control[0], self._control[1] = epoch, position

    def _config(self) -> dict[str, Any]:
        # What the sample order depends on; checkpoints must match it.
        return stream_config(self.manifest, seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer)

    def __len__(self) -> int:
        """Samples this rank gets in the current epoch (all of them when not distributed)."""
        rank, world = self._topology or workers.topology()
        remaining = self.manifest.num_samples - int(self._control[1])
        return order.rank_samples(remaining, 1, rank, world, self.drop_last)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of what iterating this dataset in this process delivered (with workers, checkpoint the loader)."""
        total = self.manifest.num_samples
        return progress_state(self._config(), self._progress, self.epoch, int(self._control[1]), total)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next iteration delivers exactly what it had not delivered."""
        epoch, consumed = read_state(state, self._config())
        self._resume_at(epoch, consumed)
        self._progress = None

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return _Iterator(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        state["_progress"] = None
        if state["_topology"] is None and get_worker_info() is None:
            # Pickled for spawn/forkserver workers: they cannot see the process group, so take it along.
            state["_topology"] = workers.topology()
        return state

    def _per_process(self) -> tuple[ShardSource, workers.SlabPool]:
        # Lives as long as the process (persistent workers keep their cache handles and slabs across epochs).
        if self._source is None or self._source[0] != os.getpid():
            source = ShardSource(self.source, self.manifest, self.storage_options, self.cache_dir, self.cache_limit,
                                 self.read)
            self._source = (os.getpid(), source, workers.SlabPool(max_slabs=8))
        return self._source[1], self._source[2]

    def _as_batches(self, batch_size: int, drop_last: bool, collate_fn: Callable[[list[Any]], Any] | None,
                    topology: tuple[int, int], persistent: bool, bundle: int = 1) -> StreamingDataset:
        # A copy that yields whole batches (what stoker.DataLoader's workers iterate); it shares the epoch and resume
        # position with this dataset through the shared `_control` tensor.
        view = copy.copy(self)
        view._block, view._collate, view._batched = int(batch_size), collate_fn, True
        view.drop_last = self.drop_last or drop_last
        view._topology = topology
        view._persistent = persistent
        view._bundle = max(1, int(bundle))
        view._source = None
        view._progress = None
        return view


def progress_state(config: dict[str, Any], progress: Progress | None, epoch: int, start: int,
                   total: int) -> dict[str, Any]:
    """Checkpoint from what an iterator delivered (or from the pending position when nothing ran)."""
    if progress is None:
        return make_state(config, epoch, start)
    if progress.done:
        return make_state(config, progress.epoch + 1, 0)
    return make_state(config, progress.epoch, order.consumed(progress.start, progress.delivered, progress.block,
                                                               progress.world, total))


class _Slot:
    """The reading side of one worker's share of one epoch: units in, gathered columns out."""

    def __init__(self, ds: StreamingDataset, epoch: int, start: int, rank: int, world: int) -> None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.ds = ds
        self.order = order.EpochOrder(ds._rows, ds.seed, epoch, ds.shuffle, ds.shuffle_buffer)
        self.deal = order.Deal(ds.manifest.num_samples, start, ds._block, rank, world, worker, num_workers,
                               ds.drop_last)
        self.turn = (rank * num_workers + worker, world * num_workers)  # this reader's place among all of them
        self.units = self.deal.units()
        self.next = 0
        self.source = ds._per_process()[0]
        self.open: dict[int, OpenShard] = {}
        self.catalog = Catalog(len(ds._rows), ds.columns)
        self.ends = self.order.shard_stream_end()
        self.epoch = epoch

    def take(self, count: int) -> tuple[dict[str, np.ndarray | RaggedPlan], np.ndarray, np.ndarray] | None:
        """Columns of the next `count` units, with their shard numbers and rows; None when the share is done."""
        units = self.units[self.next:self.next + count]
        if not len(units):
            return None
        self.next += len(units)
        positions = self.deal.positions(units)
        shards, rows = self.order.locate(positions)
        self._prepare(int(positions.min()), int(positions.max()), shards)
        return self.catalog.gather(shards, rows), shards, rows

    def run_length(self, count: int) -> int:
        """How many of the next `count` units (at least one) lie in the shuffle window where the next one starts:
        bundling those never makes a worker open or prefetch shards earlier than unit by unit would."""
        units = self.units[self.next:self.next + count]
        if len(units) <= 1:
            return len(units)
        deal = self.deal
        firsts = deal.start + units * deal.block
        lasts = np.minimum(firsts + deal.block, deal.total) - 1
        window = self.order.window_of(int(firsts[0]))
        beyond = np.flatnonzero(lasts // self.order.window != window)
        return max(1, int(beyond[0]) if len(beyond) else len(units))

    def _prepare(self, first: int, last: int, needed: np.ndarray) -> None:
        window = self.order.window_of(first)
        stream_start = window * self.order.window  # shards that end before the current window are done with
        done = [s for s in self.open if self.ends[s] <= stream_start]
        for shard in done:
            self.source.release(shard, self.open.pop(shard))
        self.source.forget(done)
        windows = range(window, self.order.window_of(last) + 1)
        ahead = [self.order.window_shards(k, self.ds.read.prefetch_shards) for k in windows]
        if not self.source.local:
            # Every reader needs every shard of the window; each starts downloading at a different one, so they
            # fetch different shards at once instead of queueing on each other's cache lock for the same one.
            k, n = self.turn
            ahead[0] = np.roll(ahead[0], -(len(ahead[0]) * k // n))
        self.source.prefetch(np.concatenate(ahead))
        for shard in np.unique(needed).tolist():
            if shard not in self.open:
                self.open[shard] = self.source.open(shard, self.ds.columns)
        self.catalog.update(self.open)

    def close(self, finished: bool) -> None:
        for shard, opened in self.open.items():
            self.source.release(shard, opened)
        self.open.clear()
        self.catalog.update(self.open)
        if finished and (self.source.local or self.ds._persistent):
            # The next epoch's first shards, read while this worker waits for it (an exiting one would waste them).
            ds = self.ds
            following = order.EpochOrder(ds._rows, ds.seed, self.epoch + 1, ds.shuffle, ds.shuffle_buffer)
            self.source.prefetch(following.window_shards(0, self.ds.read.prefetch_shards))


class _Iterator:
    """Iterator over one epoch of a StreamingDataset in this process: samples, or batches when batched."""

    def __init__(self, ds: StreamingDataset) -> None:
        self.ds = ds
        self.epoch, self.start = int(ds._control[0]), int(ds._control[1])
        self.rank, self.world = ds._topology or workers.topology()
        self.in_worker = get_worker_info() is not None
        self.slot: _Slot | None = None
        self.samples: collections.deque[Any] = collections.deque()
        self.shards: collections.deque[str] = collections.deque()
        self.pool = ds._per_process()[1] if self.in_worker else None
        self.progress = Progress(self.epoch, self.start, ds._block, self.world)
        self.checked = False  # whether a batch of the user's collate was shown to pickle
        self.sent = 0  # bundles sent in this epoch (see `_next_bundle`)
        if not self.in_worker and not ds._batched:
            ds._progress = self.progress

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        if self.slot is None:
            self.slot = _Slot(self.ds, self.epoch, self.start, self.rank, self.world)
        if self.ds._batched:
            return self._next_bundle() if self.in_worker and self.ds._bundle > 1 else self._next_batch()
        while not self.samples:
            got = self.slot.take(SAMPLE_GROUP)
            if got is None:
                self._finish()
            columns, shards, _ = got
            names = [self.ds.manifest.shards[s].name for s in shards.tolist()]
            self.samples.extend(to_samples(columns, self.ds.kinds))
            self.shards.extend(names)
        sample, shard = self.samples.popleft(), self.shards.popleft()
        if self.ds.transform is not None:
            sample = _apply(self.ds.transform, sample, shard)
        self.progress.delivered += 1
        return sample

    def _finish(self) -> None:
        assert self.slot is not None
        self.slot.close(finished=True)
        self.progress.done = True
        raise StopIteration

    def _next_batch(self) -> Any:
        assert self.slot is not None
        try:
            got = self.slot.take(1)
            if got is None:
                self._finish()
            batch = self._collate(*got)
            if self.in_worker and not self.checked and not isinstance(batch, workers.WireBatch):
                # The queue's feeder thread drops what it cannot pickle and the main process would wait forever.
                workers.check_picklable(batch)
                self.checked = True
        except StopIteration:
            raise
        except Exception as exc:
            if not self.in_worker:
                raise
            info = get_worker_info()
            return workers.WorkerError(exc, f"DataLoader worker {info.id} (pid {os.getpid()})")
        self.progress.delivered += 1
        return batch

    def _next_bundle(self) -> workers.Bundle | workers.WireBundle:
        """Up to `_bundle` consecutive batches of this worker, as one message (see `workers.Bundle`).

        The first bundles of an epoch hold 1, 2, 4... batches: the training process gets its first batch after
        one batch's work instead of a whole bundle's (0.8 s at the start of every epoch and after every autotune
        restart, with 8 batches of 100 ms), and the worker is busy all the same."""
        assert self.slot is not None
        info = get_worker_info()
        first = self.slot.next
        ds = self.ds
        count = self.slot.run_length(min(ds._bundle, 1 << min(self.sent, 16)))
        self.sent += 1
        if ds._collate is None and ds.transform is None:
            try:  # columnar: gather the batches' rows at once, copy them into one slab
                got = self.slot.take(count)
                if got is None:
                    self._finish()
                bundle = self._columnar_bundle(info.id, first, got[0], self.slot.next - first)
                self.progress.delivered += len(bundle.parts)
                return bundle
            except StopIteration:
                raise
            except Exception:
                self.slot.next = first  # again batch by batch: the batches before the failing one still arrive
        items: list[Any] = []
        for _ in range(max(1, count)):
            if self.slot.next >= len(self.slot.units):
                break
            item = self._next_batch()
            items.append(item)
            if isinstance(item, workers.WorkerError):
                break
        if not items:
            self._finish()
        return workers.Bundle(info.id, first, items)

    def _columnar_bundle(self, worker: int, first: int, columns: dict[str, Any], units: int) -> workers.WireBundle:
        # Rows of unit i are [i * block, (i + 1) * block); only the epoch's last unit can be short.
        block = self.ds._block
        column = next(iter(columns.values()))
        total = len(column.length) if isinstance(column, RaggedPlan) else len(column)
        pieces = []
        for i in range(units):
            part = slice(i * block, min((i + 1) * block, total))
            pieces.append({name: (RaggedPlan(c.sources, c.src[part], c.start[part], c.length[part], c.origins)
                                  if isinstance(c, RaggedPlan) else c[part]) for name, c in columns.items()})
        key, slab, parts = self._columnar(pieces)
        fresh, replaced = (slab.first, slab.replaced) if slab is not None else (False, None)
        tensor = slab.tensor if slab is not None else None
        return workers.WireBundle(worker, first, key, tensor if fresh or key is None else None, replaced, parts)

    def _collate(self, columns: dict[str, Any], shards: np.ndarray, rows: np.ndarray) -> Any:
        ds = self.ds
        if ds._collate is not None or ds.transform is not None:
            samples = to_samples(columns, ds.kinds)
            if ds.transform is not None:
                names = [ds.manifest.shards[s].name for s in shards.tolist()]
                samples = [_apply(ds.transform, s, n) for s, n in zip(samples, names)]
            collate = ds._collate or torch.utils.data.default_collate
            return collate(samples)
        key, slab, parts = self._columnar([columns])
        (layout, fixed), = parts
        if not self.in_worker:
            return workers.build(slab.tensor if slab is not None else None, layout, fixed)
        if slab is None:  # nothing variable-width: no slab needed
            return workers.WireBatch(None, None, None, (), fixed)
        return workers.WireBatch(key, slab.tensor if slab.first else None, slab.replaced, layout, fixed)

    def _columnar(self, batches: list[dict[str, Any]]) -> tuple[Any, _Slab | None, list[Part]]:
        """The default collate, column by column: one copy of the variable-width data of `batches` into one reusable
        slab (a plain tensor outside workers). Returns (slab key, slab, [(layout, small columns) per batch])."""
        pending = []
        at = 0
        for columns in batches:
            fixed: dict[str, Any] = {}
            plans = []
            for name in self.ds.columns:
                column = columns[name]
                kind = self.ds.kinds[name]
                if kind == "fixed":
                    fixed[name] = column.astype(np.int64)  # what default_collate makes of Python ints
                elif kind == "string":
                    fixed[name] = decode_strings(column)
                elif kind == "binary" and column.origins is not None:
                    fixed[name] = self._mapped(column)
                else:
                    fixed[name] = None  # placeholder keeps the column order
                    nbytes = int(column.length.sum()) * column.dtype.itemsize
                    plans.append((name, kind, column, at))
                    at += workers.aligned(nbytes)
            pending.append((fixed, plans))
        if not any(plans for _, plans in pending):
            return None, None, [((), fixed) for fixed, _ in pending]
        if self.pool is not None:
            key, tensor, first, replaced = self.pool.take(at)
            data = tensor.numpy()[workers.HEADER:]
        else:
            key, first, replaced = None, True, None
            data = np.empty(at, np.uint8)
            tensor = torch.from_numpy(data)
        parts = []
        for fixed, plans in pending:
            layout = []
            for name, kind, plan, offset in plans:
                nbytes = int(plan.length.sum()) * plan.dtype.itemsize
                out = data[offset:offset + nbytes].view(plan.dtype)
                ragged = plan.copy_into(out)
                layout.append((name, kind, plan.dtype.str, offset, ragged.offsets))
            parts.append((tuple(layout), fixed))
        return key, _Slab(tensor, first, replaced), parts

    def _mapped(self, plan: RaggedPlan) -> workers.ByteViews | MappedRows:
        """Bytes of local Arrow shards are not copied: the training process maps the same file pages and views the
        rows there (see `workers.build`). Disk reads still happen ahead of time, in the kernel: the worker asked
        for readahead of each shard when it prefetched it (`ShardSource.prefetch`)."""
        if not self.in_worker:
            return workers.ByteViews(memoryview(view) for view in plan.views())
        return plan.mapped()


@dataclass
class _Slab:
    tensor: torch.Tensor
    first: bool  # its first trip to the main process: the tensor travels, later only its key
    replaced: Any


Part = tuple[tuple[Any, ...], dict[str, Any]]  # (layout, small columns) of one batch


def _apply(transform: Callable[[dict[str, Any]], Any], sample: dict[str, Any], shard: str) -> Any:
    try:
        return transform(sample)
    except Exception as exc:
        exc.add_note(f"while transforming sample {sample.get('key')!r} from shard {shard}")
        raise
