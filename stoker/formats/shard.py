"""The format-level API: open any shard, iterate its record batches, read rows by index; write shards.

Every reader hands out `pyarrow.RecordBatch`es in the schemas of `stoker.formats.schema`, whatever the file format,
so everything downstream works on Arrow columns and numpy views. No format here ever unpickles anything.

This module holds the base classes and a registry of formats; each format module (`arrow_shard`, `msgpack_shard`)
registers itself with `register_format`, and `stoker.formats` imports them all, so the formats depend on this
module and never the other way round.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Union

import numpy as np
import pyarrow as pa

from stoker import storage
from stoker.errors import ConfigError, ShardError, ShardNotFoundError
from stoker.formats import integrity
from stoker.formats.arrays import arrow_to_numpy

ShardInput = Union[str, os.PathLike, bytes, memoryview, pa.Buffer, IO[bytes]]
SUFFIX: dict[str, str] = {}  # format name -> file suffix, for every registered format


class ShardReader(ABC):
    """Read-only view of one shard: record batches, and rows by index."""

    name: str
    schema: pa.Schema
    batch_offsets: np.ndarray  # first row of each batch, plus num_rows at the end
    checksums: bool = True  # iter_batches, take and row check each sample's checksum (read_batch hands out raw)

    @property
    def num_rows(self) -> int:
        return int(self.batch_offsets[-1])

    @property
    def num_batches(self) -> int:
        return len(self.batch_offsets) - 1

    @abstractmethod
    def read_batch(self, index: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        """Record batch number `index`, optionally only some columns, as stored (samples not checked)."""

    def _checking(self) -> bool:
        return self.checksums and integrity.COLUMN in self.schema.names

    def iter_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """All record batches in order, every sample checked against its checksum."""
        for i in range(self.num_batches):
            if not self._checking():
                yield self.read_batch(i, columns)
                continue
            batch = self.read_batch(i)
            integrity.check_batch(self.name, batch, np.arange(self.batch_offsets[i], self.batch_offsets[i + 1]))
            yield batch if columns is None else batch.select(list(columns))

    def take(self, rows: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows by index within this shard, in the order given, each checked against its checksum."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.name}: row out of range 0..{self.num_rows - 1}")
        if self._checking():
            table = self._take(rows, None)
            self._check(table, rows)
            return table if columns is None else table.select(list(columns))
        return self._take(rows, columns)

    def _check(self, table: pa.Table, rows: np.ndarray) -> None:
        if table.num_rows:
            integrity.check_batch(self.name, table.combine_chunks().to_batches()[0], rows)

    def _take(self, rows: np.ndarray, columns: Sequence[str] | None) -> pa.Table:
        which = np.searchsorted(self.batch_offsets, rows, side="right") - 1
        pieces = []
        for b in np.unique(which):
            batch = self.read_batch(int(b), columns)
            mask = which == b
            pieces.append((np.flatnonzero(mask), batch.take(numpy_to_arrow(rows[mask] - self.batch_offsets[b]))))
        if not pieces:
            return self.schema_table(columns)
        order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
        return pa.Table.from_batches([p[1] for p in pieces]).take(numpy_to_arrow(order))

    def row(self, index: int) -> dict[str, Any]:
        """One row as a sample dict (see `batch_to_samples`)."""
        table = self.take([index])
        return batch_to_samples(table.combine_chunks().to_batches()[0])[0]

    def schema_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        return schema.empty_table()

    def close(self) -> None:
        """Release files and maps."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ShardFormat:
    """One file format: its name, file suffix, the bytes its files start with, its reader and writer."""

    name: str
    suffix: str
    magic: bytes
    reader: type[ShardReader]
    writer: type[ShardWriter]


_FORMATS: dict[str, ShardFormat] = {}


def register_format(fmt: ShardFormat) -> None:
    """Make `fmt` known to `open_shard` and `create_writer` (format modules call this when imported)."""
    _FORMATS[fmt.name] = fmt
    SUFFIX[fmt.name] = fmt.suffix


def format_names() -> tuple[str, ...]:
    """Names of the registered formats ("arrow", "msgpack")."""
    return tuple(_FORMATS)


def _sniff(head: bytes) -> ShardFormat | None:
    return next((fmt for fmt in _FORMATS.values() if head.startswith(fmt.magic)), None)


def open_shard(source: ShardInput, *, name: str | None = None, checksums: bool = True) -> ShardReader:
    """Open a shard from a local path, bytes/buffer or binary file object; the format is detected from its magic.

    With `checksums` (the default) iter_batches, take and row check every sample they return (see
    stoker.formats.integrity); False reads without checking.
    """
    reader = _open(source, name)
    reader.checksums = checksums
    return reader


def _open(source: ShardInput, name: str | None) -> ShardReader:
    if isinstance(source, (str, os.PathLike)):
        name = name or os.fspath(source)
        try:
            with open(source, "rb") as f:
                head = f.read(8)
        except FileNotFoundError:
            raise ShardNotFoundError(f"shard {name} does not exist") from None
    elif isinstance(source, (bytes, memoryview, pa.Buffer)):
        head = bytes(memoryview(source)[:8])
    else:
        pos = source.tell()
        head = source.read(8)
        source.seek(pos)
    name = name or "<shard>"
    fmt = _sniff(head)
    if fmt is not None:
        return fmt.reader(source, name=name)
    raise ShardError(name, f"not a stoker shard (starts with {head!r}; expected an Arrow IPC file or a stoker msgpack shard)", 0)


def batch_to_samples(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Turn a record batch into sample dicts: images keep their bytes; tokens become zero-copy numpy views.

    The per-sample checksum column is the readers' business, not part of a sample."""
    columns: dict[str, list[Any]] = {}
    for name in batch.schema.names:
        if name == integrity.COLUMN:
            continue
        column = batch.column(name)
        if pa.types.is_list(column.type):
            columns[name] = list_column_to_numpy(column)
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def list_column_to_numpy(column: pa.ListArray) -> list[np.ndarray]:
    """Split a list<int> column into per-row numpy views of one shared values buffer."""
    offsets = arrow_to_numpy(column.offsets)
    values = arrow_to_numpy(column.values)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


class ShardWriter(ABC):
    """Accumulates samples and writes them as one shard file, hashing as it goes."""

    def __init__(self, path: str, schema: pa.Schema, *, batch_bytes: int = 4 << 20) -> None:
        self.path = path
        self.schema = schema
        self.batch_bytes = batch_bytes
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._hash = hashlib.sha256()
        self._digest = integrity.COLUMN in schema.names  # every sample gets its checksum (format version 2)
        self._file = open(path, "wb")
        self._closed = False

    def _write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._file.write(data)

    def add(self, sample: dict[str, Any]) -> None:
        """Append one sample (a dict with the schema's fields)."""
        if self._digest:
            sample = {**sample, integrity.COLUMN: integrity.digest_sample(sample, self.schema)}
        self._pending.append(sample)
        self._pending_bytes += sample_nbytes(sample)
        if self._pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        """Write pending samples as one record batch."""
        if self._pending:
            start = self._file.tell()
            self._write_samples(self._pending)
            self._file.flush()
            storage.start_writeback(self._file.fileno(), start, self._file.tell() - start)
            self.rows += len(self._pending)
            self._pending, self._pending_bytes = [], 0

    def close(self) -> tuple[int, int, str]:
        """Finish the file; return (rows, bytes, sha256 hex). Not fsynced: publishing does that (storage.publish_local)."""
        if not self._closed:
            self.flush()
            self._finish()
            self._file.close()
            self._closed = True
        return self.rows, os.path.getsize(self.path), self._hash.hexdigest()

    def abort(self) -> None:
        """Close and delete the partial file."""
        if not self._closed:
            self._file.close()
            self._closed = True
        if os.path.exists(self.path):
            os.remove(self.path)

    @abstractmethod
    def _write_samples(self, samples: list[dict[str, Any]]) -> None:
        """Write pending samples as one record batch."""

    @abstractmethod
    def _finish(self) -> None: ...


def sample_nbytes(sample: dict[str, Any]) -> int:
    """Approximate stored size of a sample, for record-batch and shard sizing."""
    size = 16
    for value in sample.values():
        if isinstance(value, (bytes, str)):
            size += len(value)
        elif isinstance(value, np.ndarray):
            size += value.nbytes
    return size


def numpy_to_arrow(values: np.ndarray) -> pa.Array:
    """A 1-d numpy array as an Arrow array sharing its memory.

    Not `pa.array`: its first call in a process imports pandas when pandas is installed (0.7 s here), in every
    pack worker and loader worker.
    """
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _binary_array(values: list[bytes], type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, values), np.int64, len(values)), out=offsets[1:])
    if offsets[-1] >= 1 << 31:
        raise ConfigError(f"a record batch of {offsets[-1]:,} bytes exceeds Arrow's 2 GB binary column; lower batch_bytes")
    data = b"".join(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def _column(values: list[Any], type_: pa.DataType) -> pa.Array:
    if pa.types.is_binary(type_):
        return _binary_array(values, type_)
    if pa.types.is_string(type_):
        try:
            return _binary_array([v.encode() for v in values], type_)
        except (UnicodeEncodeError, AttributeError):
            return pa.array(values, type=type_)  # the error Arrow gives for a value that is not valid text
    if pa.types.is_list(type_):
        dtype = type_.value_type.to_pandas_dtype()
        lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values]) if values else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(numpy_to_arrow(offsets), numpy_to_arrow(flat))
    return numpy_to_arrow(np.asarray(values, dtype=type_.to_pandas_dtype()))


def samples_to_batch(samples: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Build a record batch from sample dicts: one buffer per column, token lists as offsets plus flat values."""
    return pa.RecordBatch.from_arrays([_column([s[f.name] for s in samples], f.type) for f in schema], schema=schema)


def create_writer(fmt: str, path: str, schema: pa.Schema, *, batch_bytes: int = 4 << 20) -> ShardWriter:
    """A writer for `fmt` ("arrow" or "msgpack") at local `path`."""
    if fmt not in _FORMATS:
        raise ConfigError(f"unknown shard format {fmt!r}: expected one of {', '.join(_FORMATS)}")
    return _FORMATS[fmt].writer(path, schema, batch_bytes=batch_bytes)
