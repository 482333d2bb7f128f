"""The stages between a packed dataset's shards and the batches a training loop gets, one small object each.

    RowReader  ("fetch", "read")   this reader's share of an epoch's order, as gathered columns, a unit at a time
    Samples    ("read", "transform")   rows as sample dicts, each through the dataset's transform
    Batches    ("read", "transform", "collate")   a unit of rows as one batch: the user's collate_fn, or stoker's
               columnar one (variable-width data copied once into a shared-memory slab in workers)
    Bundler    ("collate", "handoff")   a worker's consecutive batches as one message, with its stage seconds

Each stage is an iterator with `state_dict()`/`load_state_dict()` (what it delivered, so a fresh stage resumes
exactly there) and counts its busy seconds on a `clock.StageClock`. `StreamingDataset` composes
RowReader -> Samples for samples, and RowReader -> Batches -> Bundler for stoker.DataLoader's workers; the
training-process side of the hand-off (messages back in order) is `loader.py`'s.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from stoker.dataloader import order, workers
from stoker.clock import StageClock
from stoker.dataloader.reader import MappedRows, OpenShard, RaggedPlan, Catalog, decode_strings, to_samples
from stoker import shm
from stoker.checkpoint import check_checkpoint
from stoker.dataloader.state import make_state
from stoker.errors import StateError

if TYPE_CHECKING:
    from stoker.dataloader.stream import BatchPlan, StreamingDataset

SAMPLE_GROUP = 256  # samples gathered at once when yielding samples one by one


@dataclass
class Progress:
    """What an iterator in this process has delivered: units of `block` samples since position `start`."""

    epoch: int
    start: int
    block: int
    world: int
    delivered: int = 0
    done: bool = False


def progress_state(config: dict[str, Any], progress: Progress | None, epoch: int, start: int,
                   total: int) -> dict[str, Any]:
    """Checkpoint from what an iterator delivered (or from the pending position when nothing ran)."""
    if progress is None:
        return make_state(config, epoch, start)
    if progress.done:
        return make_state(config, progress.epoch + 1, 0)
    return make_state(config, progress.epoch, order.consumed(progress.start, progress.delivered, progress.block,
                                                               progress.world, total))


class RowReader:
    """Stage "read"/"fetch": one reader's share of one epoch (`order.Deal`), as gathered columns of whole units."""

    def __init__(self, ds: StreamingDataset, epoch: int, start: int, block: int, drop_last: bool,
                 topology: tuple[int, int], clock: StageClock, persistent: bool = False) -> None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = topology
        self.ds = ds
        self.order = order.EpochOrder(ds.shard_rows, ds.seed, epoch, ds.shuffle, ds.shuffle_buffer)
        self.deal = order.Deal(ds.manifest.num_samples, start, block, rank, world, worker, num_workers, drop_last)
        self.turn = (rank * num_workers + worker, world * num_workers)  # this reader's place among all of them
        self.units = self.deal.units()
        self.next = 0  # units taken so far
        self.source = ds.process_resources().source
        self.open: dict[int, OpenShard] = {}
        self.early: set[int] = set()  # open shards of which only some rows are read yet (`ShardSource.read_early`)
        self.started = False  # whether this reader's first batch was read
        self.catalog = Catalog(len(ds.shard_rows), ds.columns)
        self.ends = self.order.shard_stream_end()
        self.epoch = epoch
        self.clock = clock
        self.persistent = persistent  # workers outlive the epoch: worth fetching the next epoch's first shards
        self.skip = ds.read.on_error == "skip"  # damaged samples are left out (and counted) instead of raising
        self.row_units = np.zeros(0, np.int64)  # the unit number of each row the last `take` returned
        self._skipped = 0  # damaged samples left out since the last `take_skipped`

    def __iter__(self) -> RowReader:
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray | RaggedPlan], np.ndarray, np.ndarray]:
        got = self.take(1)
        if got is None:
            raise StopIteration
        return got

    def state_dict(self) -> dict[str, Any]:
        """{epoch, start, next}: the units of this reader's share taken so far."""
        return {"epoch": self.epoch, "start": self.deal.start, "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the first `next` units (of the same epoch and start)."""
        check_checkpoint(state, what="RowReader", keys={"epoch", "start", "next"})
        if (state["epoch"], state["start"]) != (self.epoch, self.deal.start) or not 0 <= state["next"] <= len(
                self.units):
            raise StateError(f"RowReader state {state} does not fit this reader (epoch {self.epoch}, start "
                             f"{self.deal.start}, {len(self.units)} units)")
        self.next = int(state["next"])

    def take_skipped(self) -> int:
        """Damaged samples left out (skip policy) since the last call."""
        skipped, self._skipped = self._skipped, 0
        return skipped

    @property
    def remaining(self) -> int:
        """Units not taken yet."""
        return len(self.units) - self.next

    def take(self, count: int) -> tuple[dict[str, np.ndarray | RaggedPlan], np.ndarray, np.ndarray] | None:
        """Columns of the next `count` units, with their shard numbers and rows; None when the share is done."""
        units = self.units[self.next:self.next + count]
        if not len(units):
            return None
        if self.started:
            self.source.resume_downloads()  # held while the first batch was read and made (`read_early`)
        start, fetched = time.perf_counter(), self.source.fetch_seconds
        try:
            self.next += len(units)
            positions = self.deal.positions(units)
            shards, rows = self.order.locate(positions)
            self._prepare(int(positions.min()), int(positions.max()), shards, rows)
            columns = self.catalog.gather(shards, rows, self.skip)
            self.row_units = self.next - len(units) + np.arange(len(rows)) // self.deal.block
            dropped = self.catalog.dropped
            if len(dropped):  # a unit keeps its place in the order, one sample shorter per damaged one
                keep = np.ones(len(rows), bool)
                keep[dropped] = False
                shards, rows, self.row_units = shards[keep], rows[keep], self.row_units[keep]
                self._skipped += len(dropped)
            return columns, shards, rows
        finally:
            fetch = self.source.fetch_seconds - fetched
            if fetch:
                self.clock.add("fetch", fetch)
            self.clock.add("read", time.perf_counter() - start - fetch)

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

    def _prepare(self, first: int, last: int, needed: np.ndarray, rows: np.ndarray) -> None:
        window = self.order.window_of(first)
        stream_start = window * self.order.window  # shards that end before the current window are done with
        done = [s for s in self.open if self.ends[s] <= stream_start]
        for shard in done:
            self.source.release(shard, self.open.pop(shard))
            self.early.discard(shard)
        self.source.forget(done)
        windows = range(window, self.order.window_of(last) + 1)
        ahead = [self.order.window_shards(k, self.ds.read.prefetch_shards) for k in windows]
        if not self.source.local:
            # Every reader needs every shard of the window; each starts downloading at a different one, so they
            # fetch different shards at once instead of queueing on each other's cache lock for the same one.
            k, n = self.turn
            ahead[0] = np.roll(ahead[0], -(len(ahead[0]) * k // n))
        # The first batch reads just its rows of the shards still downloading (or not started), before any further
        # part of a whole shard; the others, and every later batch, open whole shards. (Reading rows by themselves
        # for every batch was measured slower: many small reads cost more CPU per byte than whole shards.)
        unopened = [s for s in np.unique(needed).tolist() if s not in self.open or s in self.early]
        early = {} if self.started else self.source.read_early({s: rows[needed == s] for s in unopened},
                                                               self.ds.columns)
        self.started = True
        self.source.prefetch(np.concatenate(ahead))
        for shard in unopened:
            if shard in early:
                self.open[shard] = early[shard]
                self.early.add(shard)
                continue
            if shard in self.early:
                self.source.release(shard, self.open.pop(shard))
                self.early.discard(shard)
            self.open[shard] = self.source.open(shard, self.ds.columns)
        self.catalog.update(self.open)

    def close(self, finished: bool) -> None:
        """Release the open shards; at the end of the share, start reading the next epoch's first shards."""
        self.source.resume_downloads()
        for shard, opened in self.open.items():
            self.source.release(shard, opened)
        self.open.clear()
        self.early.clear()
        self.catalog.update(self.open)
        if finished and (self.source.local or self.persistent):
            # The next epoch's first shards, read while this worker waits for it (an exiting one would waste them).
            ds = self.ds
            following = order.EpochOrder(ds.shard_rows, ds.seed, self.epoch + 1, ds.shuffle, ds.shuffle_buffer)
            self.source.prefetch(following.window_shards(0, ds.read.prefetch_shards))


class Samples:
    """Stage "transform" (and the "read" of building dicts): the reader's rows as samples, one by one."""

    def __init__(self, reader: RowReader, transform: Callable[[dict[str, Any]], Any] | None,
                 clock: StageClock) -> None:
        self.reader, self.transform, self.clock = reader, transform, clock
        self.ds = reader.ds
        self.samples: collections.deque[Any] = collections.deque()
        self.shards: collections.deque[str] = collections.deque()
        self.units: collections.deque[int] = collections.deque()  # of the pending samples
        self.done = False

    def __iter__(self) -> Samples:
        return self

    def __next__(self) -> Any:
        while not self.samples:
            got = self.reader.take(SAMPLE_GROUP)
            if got is None:
                if not self.done:
                    self.reader.close(finished=True)
                    self.done = True
                raise StopIteration
            with self.clock.timing("read"):
                columns, shards, _ = got
                self.samples.extend(to_samples(columns, self.ds.kinds))
                self.shards.extend(self.ds.manifest.shards[s].name for s in shards.tolist())
                self.units.extend(self.reader.row_units.tolist())
        sample, shard = self.samples.popleft(), self.shards.popleft()
        self.units.popleft()
        if self.transform is not None:
            # Per sample, so two clock reads rather than a context manager (the transform costs far more).
            start = time.perf_counter()
            try:
                sample = apply_transform(self.transform, sample, shard)
            finally:
                self.clock.add("transform", time.perf_counter() - start)
        return sample

    @property
    def position(self) -> int:
        """Units of the reader's share delivered or skipped (the next pending sample's unit, if any)."""
        return self.units[0] if self.units else self.reader.next

    def state_dict(self) -> dict[str, Any]:
        """The reader's state as of the samples delivered (gathered but undelivered ones are read again)."""
        return {"reader": dict(self.reader.state_dict(), next=self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the samples a `state_dict()` had delivered."""
        check_checkpoint(state, what="Samples", keys={"reader"})
        self.reader.load_state_dict(state["reader"])
        self.samples.clear()
        self.shards.clear()
        self.units.clear()


class Batches:
    """Stage "collate": one unit of the reader's rows as one batch (the user's transform and collate_fn, or
    stoker's columnar collate). In a worker, a failure becomes a `workers.WorkerError` item."""

    def __init__(self, reader: RowReader, plan: BatchPlan, clock: StageClock, in_worker: bool) -> None:
        self.reader, self.plan, self.clock, self.in_worker = reader, plan, clock, in_worker
        self.ds = reader.ds
        self.pool = self.ds.process_resources().pool if in_worker else None
        self.checked = False  # whether a batch of the user's collate was shown to pickle
        self.done = False

    @property
    def columnar(self) -> bool:
        """Whether batches are stoker's own columnar ones (no transform, no collate_fn)."""
        return self.plan.collate_fn is None and self.ds.transform is None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        try:
            got = self.reader.take(1)
            if got is None:
                self.finish()
            batch = self.collate(*got)
            if self.in_worker and not self.checked and not isinstance(batch, workers.WireBatch):
                # The queue's feeder thread drops what it cannot pickle and the main process would wait forever.
                with self.clock.timing("handoff"):
                    workers.check_picklable(batch)
                self.checked = True
        except StopIteration:
            raise
        except Exception as exc:
            if not self.in_worker:
                raise
            info = get_worker_info()
            return workers.WorkerError(exc, f"DataLoader worker {info.id} (pid {os.getpid()})")
        return batch

    def finish(self) -> None:
        """End of the share: release its shards (once) and stop."""
        if not self.done:
            self.reader.close(finished=True)
            self.done = True
        raise StopIteration

    def state_dict(self) -> dict[str, Any]:
        """The reader's state: one unit per batch delivered."""
        return {"reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches a `state_dict()` had delivered."""
        check_checkpoint(state, what="Batches", keys={"reader"})
        self.reader.load_state_dict(state["reader"])

    def collate(self, columns: dict[str, Any], shards: np.ndarray, rows: np.ndarray) -> Any:
        """One unit's rows as the batch the user gets (or its wire form, in a worker)."""
        ds, collate_fn = self.ds, self.plan.collate_fn
        if not self.columnar:
            clock = self.clock
            with clock.timing("read"):
                samples = to_samples(columns, ds.kinds)
            if ds.transform is not None:
                with clock.timing("transform"):
                    names = [ds.manifest.shards[s].name for s in shards.tolist()]
                    samples = [apply_transform(ds.transform, s, n) for s, n in zip(samples, names)]
            if collate_fn is not None:
                with clock.timing("transform"):  # the user's collate_fn
                    if self.pool is None:
                        return collate_fn(samples)
                    # stoker's own transforms build their output in this worker's reusable slabs
                    with shm.lending(self.pool) as lent:
                        batch = collate_fn(samples)
                    return workers.wire_slabs(batch, lent) if lent else batch
            with clock.timing("collate"):
                return torch.utils.data.default_collate(samples)
        with self.clock.timing("collate"):
            key, slab, parts = self.columnar_parts([columns])
            (layout, fixed), = parts
            if not self.in_worker:
                return workers.build(slab.tensor if slab is not None else None, layout, fixed)
            if slab is None:  # nothing variable-width: no slab needed
                return workers.WireBatch(None, None, None, (), fixed)
            return workers.WireBatch(key, slab.tensor if slab.first else None, slab.replaced, layout, fixed)

    def columnar_bundle(self, worker: int, first: int, columns: dict[str, Any], units: int) -> workers.WireBundle:
        """`units` consecutive batches (numbers `first`, `first + 1`...) of gathered `columns` sharing one slab."""
        with self.clock.timing("collate"):
            # Rows of unit i (one sample short per damaged one left out, see RowReader.take).
            bounds = np.searchsorted(self.reader.row_units, first + np.arange(units + 1)).tolist()
            pieces = []
            for i in range(units):
                part = slice(bounds[i], bounds[i + 1])
                pieces.append({name: (RaggedPlan(c.sources, c.src[part], c.start[part], c.length[part], c.origins)
                                      if isinstance(c, RaggedPlan) else c[part]) for name, c in columns.items()})
            key, slab, parts = self.columnar_parts(pieces)
            fresh, replaced = (slab.first, slab.replaced) if slab is not None else (False, None)
            tensor = slab.tensor if slab is not None else None
            return workers.WireBundle(worker, first, key, tensor if fresh or key is None else None, replaced, parts)

    def columnar_parts(self, batches: list[dict[str, Any]]) -> tuple[Any, _Slab | None, list[Part]]:
        """The default collate, column by column: one copy of the variable-width data of `batches` into one reusable
        slab (a plain tensor outside workers). Returns (slab key, slab, [(layout, small columns) per batch])."""
        ds = self.ds
        pending = []
        at = 0
        for columns in batches:
            fixed: dict[str, Any] = {}
            plans = []
            for name in ds.columns:
                column = columns[name]
                kind = ds.kinds[name]
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
                    at += shm.aligned(nbytes)
            pending.append((fixed, plans))
        if not any(plans for _, plans in pending):
            return None, None, [((), fixed) for fixed, _ in pending]
        if self.pool is not None:
            key, tensor, first, replaced = self.pool.take(at)
            data = tensor.numpy()[shm.HEADER:]
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


class Bundler:
    """Stage "bundle": up to `plan.bundle` consecutive batches of this reader as one message (`workers.Bundle`),
    with a worker's stage seconds since its previous message. Outside workers, one batch per message.

    The first bundles of an epoch hold 1, 2, 4... batches: the training process gets its first batch after one
    batch's work instead of a whole bundle's (0.8 s at the start of every epoch and after every autotune restart,
    with 8 batches of 100 ms), and the worker is busy all the same."""

    def __init__(self, batches: Batches, clock: StageClock) -> None:
        self.batches, self.clock = batches, clock
        self.reader = batches.reader
        self.sent = 0  # messages sent in this epoch

    def __iter__(self) -> Bundler:
        return self

    def __next__(self) -> workers.Bundle | workers.WireBundle:
        message = self._next_message()
        if self.batches.in_worker:
            message.times = self.clock.take()
        message.skipped = self.reader.take_skipped()
        return message

    def state_dict(self) -> dict[str, Any]:
        """The batches' state and the number of messages sent (bundles grow with it)."""
        return {"batches": self.batches.state_dict(), "sent": self.sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the messages a `state_dict()` had sent."""
        check_checkpoint(state, what="Bundler", keys={"batches", "sent"})
        self.batches.load_state_dict(state["batches"])
        self.sent = int(state["sent"])

    def _next_message(self) -> workers.Bundle | workers.WireBundle:
        reader, batches = self.reader, self.batches
        info = get_worker_info()
        worker = 0 if info is None else info.id
        first = reader.next
        count = reader.run_length(min(batches.plan.bundle, 1 << min(self.sent, 16)))
        self.sent += 1
        if batches.columnar and batches.in_worker:
            try:  # columnar: gather the batches' rows at once, copy them into one slab
                got = reader.take(count)
                if got is None:
                    batches.finish()
                return batches.columnar_bundle(worker, first, got[0], reader.next - first)
            except StopIteration:
                raise
            except Exception:
                # Again batch by batch: the batches before the failing one still arrive.
                reader.load_state_dict(dict(reader.state_dict(), next=first))
                reader.take_skipped()  # counted again as they are read again
        items: list[Any] = []
        for _ in range(max(1, count)):
            if not reader.remaining:
                break
            item = next(batches)
            items.append(item)
            if isinstance(item, workers.WorkerError):
                break
        if not items:
            batches.finish()
        return workers.Bundle(worker, first, items)


@dataclass
class _Slab:
    tensor: torch.Tensor
    first: bool  # its first trip to the main process: the tensor travels, later only its key
    replaced: Any


Part = tuple[tuple[Any, ...], dict[str, Any]]  # (layout, small columns) of one batch


def apply_transform(transform: Callable[[dict[str, Any]], Any], sample: dict[str, Any], shard: str) -> Any:
    """transform(sample), with a note naming the sample and its shard on failure."""
    try:
        return transform(sample)
    except Exception as exc:
        exc.add_note(f"while transforming sample {sample.get('key')!r} from shard {shard}")
        raise
