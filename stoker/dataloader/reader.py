"""Shards in, columns out: open shards (local, or remote through the cache), prefetch, gather rows by index.

`ShardSource` lives in one process (a DataLoader worker or the main process) and is never pickled. Local shards are
memory-mapped where they lie; remote ones are downloaded into the `ShardCache` with parallel ranged reads, by
daemon threads that run ahead of the reader (`prefetch`). `gather` turns (shard, row) pairs into columns: fixed-width
columns as numpy arrays, variable-width ones (image bytes, token lists, keys) as `Ragged` values buffers plus
offsets, copied once, straight from the mapped record batches into a buffer the caller provides.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from torch.utils.data import get_worker_info

from stoker import cache, storage
from stoker.dataloader import partial, remote
from stoker.errors import ConfigError, ShardError, ShardNotFoundError
from stoker.formats import integrity
from stoker.formats.arrays import column_view
from stoker.formats.conform import Rules, check_batch, check_schema
from stoker.lru import LRU
from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.shard import ShardReader, open_shard

DEFAULT_CACHE_DIR = "~/.cache/stoker/shards"
EARLY_SHARE = 4  # a shard of which a batch wants more than 1/EARLY_SHARE of the rows is read whole, not by rows
IDLE_SHARDS = 64  # local shards kept mapped after use, for the next window or epoch of a persistent worker

Identity = tuple[Any, ...]  # (path, device, inode, size, mtime) of a local shard file; () when unknown


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read (the remote-storage fields: every wait is bounded)."""

    prefetch_shards: int = 2  # shards fetched ahead of the ones being read
    parallel_reads: int = 8  # ranged reads in flight per shard
    part_size: int = 8 << 20  # bytes per ranged read: ~80 ms at 100 MB/s, several per shard in flight
    attempts: int = 3  # tries per ranged read before giving up
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    connect_timeout: float = 10.0  # per request, passed to the storage client
    read_timeout: float = 30.0  # per request, passed to the storage client
    shard_timeout: float = 300.0  # bound on fetching one shard, retries and waits for other processes included
    # Remote Arrow shards at least this large have the rows a reader's first batch needs read by themselves while
    # the shard is still downloading (`partial`: a first batch need not wait for whole shards); None: never.
    early_min_bytes: int | None = 0
    checksums: bool = True  # check every sample against the checksum packed with it (stoker.formats.integrity)
    on_error: str = "raise"  # a damaged sample raises a ChecksumError; "skip": dropped, warned about and counted

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={self.on_error!r}: expected 'raise' or 'skip'")
        if min(self.parallel_reads, self.part_size, self.attempts) < 1 or self.prefetch_shards < 0 or (
                self.early_min_bytes is not None and self.early_min_bytes < 0):
            raise ConfigError(f"invalid read options {self}: counts and sizes must be positive")
        if min(self.backoff, self.connect_timeout, self.read_timeout, self.shard_timeout) < 0:
            raise ConfigError(f"invalid read options {self}: times must not be negative")


class Ragged(NamedTuple):
    """Variable-length values of n rows: row i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray  # int64, n + 1


class RaggedColumn(NamedTuple):
    """A variable-width column of one shard: row r is sources[src[r]][start[r]:start[r] + length[r]]."""

    sources: list[np.ndarray]  # one values buffer per record batch (views of the mapped file)
    src: np.ndarray  # int32
    start: np.ndarray  # int64
    length: np.ndarray  # int64


class OpenShard:
    """A shard opened for reading, with per-row tables of every column built once (numpy, no Python objects)."""

    def __init__(self, reader: ShardReader, columns: Sequence[str], info: ShardInfo | None = None,
                 rules: Rules | None = None, *, identity: Identity = (), mapped: bool = False,
                 check: Mapping[str, str] | None = None, on_damage: Callable[[], None] | None = None) -> None:
        self.reader = reader
        # Called when a sample of this shard fails its checksum: a cache entry is evicted, so the next open refetches.
        self.on_damage = on_damage
        self.name = reader.name
        self.requested = tuple(columns)
        # Checked: `check` is the manifest's schema; every column is read, as a sample's checksum covers all its fields.
        self.checked = bool(check)
        if rules is not None:  # before a byte is read: no value of a shard that is not the manifest's is served
            try:
                check_schema(self.name, reader.schema, rules)
            except ShardError:
                reader.close()
                raise
        if check:
            # In the shard's own field order, the order its writer hashed them in (the manifest's is sorted).
            names = reader.schema.names
            columns = [n for n in names if n in check] + [n for n in check if n not in names]
        self.identity = identity  # of a local file: reused only while it is unchanged
        self.mapped = mapped and bool(identity)  # its values are views of the file, which another process can map
        self.columns: dict[str, np.ndarray | RaggedColumn] = {}
        try:
            batches = [reader.read_batch(b, list(columns)) for b in range(reader.num_batches)]
            if rules is not None:
                for b, batch in enumerate(batches):
                    check_batch(self.name, batch, int(reader.batch_offsets[b]), rules)
        except BaseException:
            reader.close()
            raise
        for name in columns:
            views = [column_view(batch.column(name)) for batch in batches]
            if views and isinstance(views[0], tuple):
                counts = [len(starts) - 1 for starts, _ in views]
                self.columns[name] = RaggedColumn(
                    [values for _, values in views],
                    np.repeat(np.arange(len(views), dtype=np.int32), counts),
                    np.concatenate([starts[:-1] for starts, _ in views]),
                    np.concatenate([np.diff(starts) for starts, _ in views]),
                )
            elif views:
                self.columns[name] = np.concatenate(views)
            else:
                self.columns[name] = np.zeros(0, np.int64)
        if info is not None:  # rows and token lengths against the manifest
            try:
                check_against_manifest(self, info)
            except BaseException:
                self.close()
                raise

    def check_unchanged(self) -> None:
        """A ShardError naming the shard if its local file was truncated or replaced since it was mapped: reading
        a mapped page past a truncated end kills the process with SIGBUS instead of raising."""
        if not self.identity or unchanged(self.identity):
            return
        if isinstance(self.identity, cache.Held):
            raise ShardError(self.name, f"cache entry {self.identity[0]} was truncated or rewritten while being read; "
                             "remove it from the cache and restart the epoch")
        raise ShardError(self.name, f"changed on disk while being read ({self.identity[0]}: truncated or "
                             "replaced); restart the epoch once the dataset is whole again")

    def close(self) -> None:
        self.columns.clear()
        self.reader.close()
        if isinstance(self.identity, cache.Held):
            self.identity.close()


def check_against_manifest(shard: OpenShard, info: ShardInfo) -> None:
    """A ShardError unless the opened shard has the manifest's rows and token lengths: one vectorised pass,
    once per shard open. Without it a replaced or forged shard gives numpy IndexErrors (token ids, labels and
    nulls are checked batch by batch by `stoker.formats.conform`)."""
    rows = shard.reader.num_rows
    if rows != info.rows:
        raise ShardError(shard.name, f"has {rows} rows but the manifest says {info.rows}: the shard was replaced "
                         "or the manifest is stale (run `stoker verify`)")
    for name, column in shard.columns.items():
        if not isinstance(column, RaggedColumn) or column.sources[0].dtype == np.uint8:
            continue  # bytes and strings: nothing to bound here
        if info.lengths is not None and not np.array_equal(column.length, info.lengths):
            row = int(np.flatnonzero(column.length != info.lengths)[0])
            raise ShardError(shard.name, f"column {name!r} has {int(column.length[row])} tokens but the manifest "
                             f"records {int(info.lengths[row])}", row=row)


@dataclass
class RaggedPlan:
    """Where each requested row of a variable-width column lies: sources[src[i]][start[i]:start[i] + length[i]]."""

    sources: list[np.ndarray]
    src: np.ndarray
    start: np.ndarray
    length: np.ndarray  # in values (bytes, or tokens)
    origins: list[tuple[Identity, int]] | None = None  # per source: (file, record batch), when all are mapped files

    @property
    def dtype(self) -> np.dtype:
        return self.sources[0].dtype if self.sources else np.dtype(np.uint8)

    def views(self) -> list[np.ndarray]:
        """Per-row views of the mapped record batches (no copy)."""
        sources = self.sources
        return [sources[s][a:a + n] for s, a, n in zip(self.src.tolist(), self.start.tolist(), self.length.tolist())]

    def copy_into(self, out: np.ndarray) -> Ragged:
        """Copy the rows back to back into `out` (at least `self.length.sum()` values long)."""
        offsets = np.zeros(len(self.length) + 1, np.int64)
        np.cumsum(self.length, out=offsets[1:])
        if len(self.length):
            np.concatenate(self.views(), out=out[:offsets[-1]])
        return Ragged(out[:offsets[-1]], offsets)

    def mapped(self) -> MappedRows | None:
        """The rows as (file, record batch, start, length) references, when every source is a mapped file."""
        if self.origins is None:
            return None
        used, ref = np.unique(self.src, return_inverse=True)
        refs = [self.origins[s] for s in used.tolist()]
        # Cache entries cross with a pin each (one per file), so that eviction cannot take them before they are mapped.
        pinned = {identity: identity.handoff() for identity in {identity for identity, _ in refs}
                  if isinstance(identity, cache.Held)}
        return MappedRows(tuple((pinned.get(identity, identity), batch) for identity, batch in refs),
                          ref.astype(np.int32), self.start, self.length)


class MappedRows(NamedTuple):
    """Rows of a variable-width column named by where they lie in local Arrow files, for a process that maps the
    same files: row i is values of record batch refs[ref[i]][1] of file refs[ref[i]][0], [start[i], +length[i])."""

    refs: tuple[tuple[Identity, int], ...]
    ref: np.ndarray
    start: np.ndarray
    length: np.ndarray


def mapped_values(identity: Identity, column: str) -> list[np.ndarray]:
    """The values buffers (one per record batch) of `column` in the local Arrow file `identity` names, mapped into
    this process; a ShardError if the file is gone or changed since a worker planned rows from it."""
    path = identity[0]
    name = os.path.basename(path)
    fd = getattr(identity, "fd", None)  # a cache entry's pinned file (`cache.claim`): the very file the worker read
    if not unchanged(identity):
        raise ShardError(name, f"cache entry {path} changed while being read; restart the epoch" if fd is not None
                         else f"changed on disk while being read ({path}); restart the epoch")
    if fd is not None:
        path = f"/proc/self/fd/{fd}"
    opened = OpenShard(open_shard(path, name=name), [column], identity=identity)
    sources = opened.columns[column].sources
    opened.close()  # the arrays keep the mapping alive (Arrow counts its users)
    return sources


def gather(shards: Mapping[int, OpenShard], shard_ids: np.ndarray, rows: np.ndarray,
           columns: Sequence[str]) -> dict[str, np.ndarray | RaggedPlan]:
    """Rows (shard_ids[i], rows[i]) in the given order: fixed-width columns gathered, variable ones planned;
    rows of checked shards are checked against their checksums first."""
    some = shards[int(shard_ids[0])] if len(shard_ids) else None
    if some is not None and some.checked:
        out = _gather(shards, shard_ids, rows, tuple(some.columns))
        _check(out, shard_ids, rows, lambda s: shards[s].name, damaged=lambda s: _damaged(shards[s]))
        return {name: out[name] for name in columns}
    return _gather(shards, shard_ids, rows, columns)


def _check(out: Mapping[str, Any], shard_ids: np.ndarray, rows: np.ndarray, name_of: Any,
           skip: bool = False, damaged: Callable[[int], None] | None = None) -> np.ndarray:
    """Indices of the gathered rows that are not as packed: a ChecksumError naming shard, row and key for the first
    of them, or with `skip` a SkippedSampleWarning for each; `damaged(shard_id)` is called for the shard of each."""
    checked = integrity.Rows(len(rows))
    for name, column in out.items():
        if name == integrity.COLUMN:
            continue
        if isinstance(column, RaggedPlan):
            checked.add_variable(column.sources, column.src, column.start, column.length)
        else:
            checked.add_fixed(column)
    bad = integrity.mismatches(checked, out[integrity.COLUMN])
    keys = out.get("key")
    views = keys.views() if len(bad) and isinstance(keys, RaggedPlan) else None
    for i in bad.tolist():
        key = bytes(views[i]).decode(errors="replace") if views is not None else keys
        where = (name_of(int(shard_ids[i])), int(rows[i]), key)
        if damaged is not None:
            damaged(int(shard_ids[i]))
        if not skip:
            raise integrity.mismatch_error(*where)
        warnings.warn(integrity.skip_warning(*where), stacklevel=2)
    return bad


def _damaged(shard: OpenShard) -> None:
    if shard.on_damage is not None:
        shard.on_damage()
        shard.on_damage = None  # once is enough: the entry is gone


def _without(columns: Mapping[str, Any], drop: np.ndarray) -> dict[str, Any]:
    """`columns` without the rows numbered in `drop`."""
    first = next(iter(columns.values()))
    keep = np.ones(len(first.length) if isinstance(first, RaggedPlan) else len(first), bool)
    keep[drop] = False
    return {name: RaggedPlan(c.sources, c.src[keep], c.start[keep], c.length[keep], c.origins)
            if isinstance(c, RaggedPlan) else c[keep] for name, c in columns.items()}


def _gather(shards: Mapping[int, OpenShard], shard_ids: np.ndarray, rows: np.ndarray,
            columns: Sequence[str]) -> dict[str, np.ndarray | RaggedPlan]:
    unique = np.unique(shard_ids)
    if not len(unique):
        raise ValueError("gather needs at least one row")
    if len(unique) == 1:  # the common case inside a shuffle window of large shards
        groups = [(shards[int(unique[0])], slice(None), rows)]
    else:
        groups = [(shards[int(s)], mask, rows[mask]) for s in unique.tolist() for mask in [shard_ids == s]]
    n = len(rows)
    out: dict[str, Any] = {}
    for name in columns:
        first = groups[0][0].columns[name]
        if isinstance(first, RaggedColumn):
            plan = RaggedPlan([], np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int64))
            for shard, where, local in groups:
                column = shard.columns[name]
                plan.src[where] = column.src[local] + len(plan.sources)
                plan.start[where] = column.start[local]
                plan.length[where] = column.length[local]
                plan.sources.extend(column.sources)
            out[name] = plan
        else:
            values = np.empty(n, first.dtype)
            for shard, where, local in groups:
                values[where] = shard.columns[name][local]
            out[name] = values
    return out


class Catalog:
    """The open shards of one reader as one table, so that a batch is gathered with one fancy index per column.

    `gather` above groups rows by shard, which costs a few numpy calls per open shard and column; a shuffle window
    over many shards makes that the larger part of a batch's work. The catalog concatenates the per-row tables of
    the open shards once each time that set changes (once per window) and maps (shard, row) to a catalog row by
    adding the shard's base.
    """

    def __init__(self, num_shards: int, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.base = np.full(num_shards, -1, np.int64)
        self.tables: dict[str, np.ndarray | RaggedColumn] = {}
        self.origins: list[tuple[Identity, int]] | None = None  # per source of a ragged table, when all are mapped
        self._members: tuple[int, ...] | None = None
        self._read = self.columns  # all columns when the open shards are checked (see OpenShard)
        self._names: dict[int, str] = {}
        self._by_id: dict[int, OpenShard] = {}
        self._opened: list[OpenShard] = []
        self.dropped = np.zeros(0, np.int64)  # rows the last `gather` left out (damaged, skip policy)

    def update(self, shards: Mapping[int, OpenShard]) -> None:
        """Rebuild the tables if the set of open shards changed."""
        members = tuple((s, id(shards[s])) for s in sorted(shards))
        if members == self._members:
            return
        self._members = members
        self.base[:] = -1
        ids = [s for s, _ in members]
        opened = [shards[s] for s in ids]
        self._names = {s: shards[s].name for s in ids}
        self._by_id = {s: shards[s] for s in ids}
        self._read = tuple(opened[0].columns) if opened and opened[0].checked else self.columns
        self._opened = opened
        counts = [shard.reader.num_rows for shard in opened]
        self.base[ids] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else []
        self.tables = {}
        self.origins = None
        if opened and all(shard.mapped for shard in opened):
            # Sources are the same for every ragged column: one per record batch of each open shard, in order.
            self.origins = [(shard.identity, k) for shard in opened for k in range(shard.reader.num_batches)]
        for name in self._read:
            parts = [shard.columns[name] for shard in opened]
            if parts and isinstance(parts[0], RaggedColumn):
                sources: list[np.ndarray] = []
                srcs = []
                for part in parts:
                    srcs.append(part.src + len(sources))
                    sources.extend(part.sources)
                self.tables[name] = RaggedColumn(sources, np.concatenate(srcs), np.concatenate([p.start for p in parts]),
                                                 np.concatenate([p.length for p in parts]))
            else:
                self.tables[name] = np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def gather(self, shard_ids: np.ndarray, rows: np.ndarray,
               skip: bool = False) -> dict[str, np.ndarray | RaggedPlan]:
        """Like `gather`, for shards that are all open (see `update`); with `skip`, damaged rows are left out (their
        indices in `dropped`) instead of raising."""
        index = self.base[shard_ids] + rows
        if not len(index):
            raise ValueError("gather needs at least one row")
        for shard in self._opened:  # one stat each: a truncated mapped file would be SIGBUS, not an error
            shard.check_unchanged()
        if index.min() < 0:
            missing = sorted(set(np.asarray(shard_ids)[self.base[shard_ids] < 0].tolist()))
            raise KeyError(f"shards {missing} are not open")
        out: dict[str, Any] = {}
        for name in self._read:
            table = self.tables[name]
            if isinstance(table, RaggedColumn):
                out[name] = RaggedPlan(table.sources, table.src[index], table.start[index], table.length[index],
                                       self.origins)
            else:
                out[name] = table[index]
        self.dropped = np.zeros(0, np.int64)
        if self._read is self.columns:
            return out
        self.dropped = _check(out, shard_ids, rows, self._names.__getitem__, skip,
                              damaged=lambda s: _damaged(self._by_id[s]))
        if len(self.dropped):
            out = _without(out, self.dropped)
        return {name: out[name] for name in self.columns}


def decode_strings(plan: RaggedPlan) -> list[str]:
    """UTF-8 rows of a string column as Python strings (one C call after one copy)."""
    ragged = plan.copy_into(np.empty(int(plan.length.sum()), np.uint8))
    array = pa.StringArray.from_buffers(len(plan.length), pa.py_buffer(ragged.offsets.astype(np.int32)),
                                        pa.py_buffer(ragged.values))
    return array.to_pylist()


def to_samples(columns: Mapping[str, Any], kinds: Mapping[str, str]) -> list[dict[str, Any]]:
    """Sample dicts like `batch_to_samples`: ints, str keys, image bytes, token arrays (copies, safe to keep)."""
    values: dict[str, list[Any]] = {}
    for name, column in columns.items():
        kind = kinds[name]
        if kind == "string":
            values[name] = decode_strings(column)
        elif kind == "list":
            ragged = column.copy_into(np.empty(int(column.length.sum()), column.dtype))
            values[name] = np.split(ragged.values, ragged.offsets[1:-1]) if len(column.length) else []
        elif kind == "binary":
            values[name] = [view.tobytes() for view in column.views()]
        else:
            values[name] = column.tolist()
    return [dict(zip(values, row)) for row in zip(*values.values())]


class ShardSource:
    """Opens the shards of one dataset in this process: local files directly, remote ones via the cache."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict[str, Any] | None,
                 cache_dir: str | None, cache_limit: int, options: ReadOptions) -> None:
        self.url = url
        self.manifest = manifest
        self.options = options
        self.local = storage.is_local(url)
        self._check = integrity.checked_columns(manifest.schema, options.checksums)
        self._pid = os.getpid()
        # Views of cache entries go to the training process only from workers: there a mapped file holds its disk
        # space once evicted only while the loader maps it; batches a user keeps in this process would hold it longer.
        self._in_worker = get_worker_info() is not None
        self.fetch_seconds = 0.0  # spent in `open` waiting for downloads and cache fills (the "fetch" stage)
        self._pending: dict[int, Any] = {}
        self._idle: LRU[tuple[int, tuple[str, ...]], OpenShard] = LRU(IDLE_SHARDS, OpenShard.close)
        if not self.local:
            shard_cache = cache.ShardCache(cache_dir or DEFAULT_CACHE_DIR, cache_limit)
            self._remote = remote.RemoteShards(url, manifest, storage_options, shard_cache, options)

    def _shard_url(self, shard: int) -> str:
        return storage.join(self.url, self.manifest.shards[shard].name)

    def prefetch(self, shards: Sequence[int]) -> None:
        """Start reading `shards` in the background (download into the cache, or page-cache readahead)."""
        for shard in shards:
            shard = int(shard)
            if shard in self._pending or not self.manifest.shards[shard].rows:
                continue  # empty shards are never opened
            if self.local:
                _readahead(storage.local_path(self._shard_url(shard)))
                self._pending[shard] = None
            else:
                self._pending[shard] = self._remote.submit(shard)

    def forget(self, shards: Sequence[int]) -> None:
        """Drop finished prefetches of shards that will not be read again soon."""
        for shard in shards:
            future = self._pending.get(int(shard))
            if future is None or future.done():
                self._pending.pop(int(shard), None)

    def read_early(self, wanted: Mapping[int, np.ndarray], columns: Sequence[str]) -> dict[int, OpenShard]:
        """Of the `wanted` rows (row numbers per shard), those of remote shards still being downloaded, read by
        themselves (`partial`): each such shard opened with those rows readable, the others empty. Shards missing
        from the result are to be opened whole (`open`): local, finished downloading, or not read this way (only
        Arrow shards whose every sample is checked on read are). In a DataLoader worker, no further part of a whole
        shard starts until `resume_downloads` (or `open`): the batch comes first."""
        if self.local or not self._check or self.manifest.format != "arrow":
            return {}
        todo: dict[int, partial.PartialShard] = {}
        for shard, rows in wanted.items():
            info = self.manifest.shards[shard]
            if not self._remote.holds(shard) or len(rows) * EARLY_SHARE > info.rows:
                continue  # small, or much of it wanted: read whole
            future = self._pending.get(shard)
            if future.done() if future is not None else self._remote.cached(shard):
                continue
            todo[shard] = partial.PartialShard(info.name, info.bytes)
        if not todo:
            return {}
        waited = time.perf_counter()
        try:
            # Held until the batch is made only in a DataLoader worker: in the training process the next take comes
            # after the training step, which whole shards must not wait for.
            self._remote.read_rows({todo[s]: np.asarray(wanted[s], np.int64) for s in todo}, hold=self._in_worker)
            return {shard: OpenShard(read.reader(), columns, None, self.manifest.rules, check=self._check)
                    for shard, read in todo.items()}
        except (ShardError, OSError, ValueError, IndexError, pa.ArrowException):
            # A damaged or forged shard, or a failed read (StorageError, missing objects): the whole-shard path
            # reads it again and reports what is wrong with it, bounded as ever.
            return {}
        finally:
            self.fetch_seconds += time.perf_counter() - waited

    def resume_downloads(self) -> None:
        """Let the downloads of whole shards go on after `read_early`."""
        if not self.local:
            self._remote.resume()

    def open(self, shard: int, columns: Sequence[str]) -> OpenShard:
        """Open a shard for reading, waiting for its prefetch (or fetching it now)."""
        self.resume_downloads()  # a whole shard is needed now (its download may wait behind held ones)
        name = self.manifest.shards[shard].name
        if self.local:
            path = storage.local_path(self._shard_url(shard))
            identity = file_identity(path)
            kept = self._idle.pop((shard, tuple(columns)))
            if kept is not None:
                if identity and kept.identity == identity:
                    return kept  # still mapped, tables built and checked: reopening costs more than it reads
                kept.close()  # the file changed since: read (and check) the new one
            return OpenShard(open_shard(path, name=name), columns, self.manifest.shards[shard],
                             self.manifest.rules, identity=identity,
                             mapped=self.manifest.format == "arrow", check=self._check)
        for attempt in range(2):
            future = self._pending.pop(shard, None)
            if future is None:
                future = self._remote.submit(shard)
            waited = time.perf_counter()
            try:
                path = self._remote.wait(future, name)
            finally:
                self.fetch_seconds += time.perf_counter() - waited
            key = os.path.basename(path)
            try:
                # Held while open, so not evicted under the reader; rows go to the training process as views of
                # the same file (like local shards), which `cache.Held.handoff` keeps on disk until it is mapped there.
                held = cache.hold(path, f"shard {name}")
                try:
                    return OpenShard(open_shard(held.path, name=name), columns, self.manifest.shards[shard],
                                     self.manifest.rules, check=self._check, identity=held,
                                     mapped=self.manifest.format == "arrow" and self._in_worker,
                                     on_damage=lambda: self._remote.cache.evict(key, 2 * self.options.shard_timeout))
                except BaseException:
                    held.close()
                    raise
            except ShardNotFoundError:
                if attempt:  # evicted by another process between fill and open, twice: the cache is too small
                    raise ConfigError(f"cache {self._remote.cache.directory} evicts shard {name} before it can be opened; "
                                      "raise cache_limit") from None
            except ShardError:
                # A damaged cache entry (or a damaged download: format-2 shards are not hashed whole as they are
                # downloaded, see `remote.RemoteShards`): never kept, fetched once more.
                self._remote.cache.evict(key, 2 * self.options.shard_timeout)
                if attempt:  # refetched and still unreadable: the stored shard itself is bad
                    raise
        raise AssertionError("unreachable")

    def release(self, shard: int, opened: OpenShard) -> None:
        """Done with `opened` for now. Local shards stay mapped (the least recently used `IDLE_SHARDS` of them),
        so that a persistent worker's next epoch, or a window that comes back to a shard, does not reopen it."""
        if not self.local or not opened.identity:
            opened.close()
            return
        self._idle.put((int(shard), opened.requested), opened)

    def close(self) -> None:
        self.resume_downloads()
        self._idle.clear()
        if not self.local and os.getpid() == self._pid:
            self._remote.close()
        self._pending.clear()


def file_identity(path: str, fd: int | None = None) -> Identity:
    """(path, device, inode, size, mtime) of a local file (of the open file `fd`, if given, which stays the file
    named `path` when read), or () if it cannot be read."""
    try:
        st = os.stat(path) if fd is None else os.fstat(fd)
    except OSError:
        return ()  # opening it reports the error
    return path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def unchanged(identity: Identity) -> bool:
    """Whether the file `identity` was taken of is still so: by its name, or by the open file of a cache entry held
    or pinned (`cache.Held`, `cache.Handoff`: their `fd`), which no eviction or refill can swap."""
    return file_identity(identity[0], getattr(identity, "fd", None)) == tuple(identity)


def _readahead(path: str) -> None:
    # Ask the kernel to start reading the whole file into the page cache; returns at once.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # reported when the shard is opened
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)

