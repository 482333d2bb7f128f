"""Rows of a remote Arrow shard read before the shard is downloaded, so that a first batch does not wait for it.

A shuffle window spans many shards, so a window's first batch needs a few rows of nearly every one of them: waiting
for whole shards makes the first batch wait for the whole window (hundreds of MB). While a shard is still
downloading, `fetch_rows` reads just the rows asked for with small ranged reads, a few round trips for all shards
at once:

1. the file's head (its schema) and tail (its footer: where each record batch lies);
2. every record batch's metadata (its row count: which batch holds a row), with the first bytes of its body (its
   small buffers usually lie there); one request per record batch, so shards of many record batches take longer;
3. the remaining small buffers (offsets, fixed-width columns, checksums) and the needed rows' slices of the large
   values buffers (image bytes, token ids); a batch whose offsets were not in step 2 gets its rows in one more round.

pyarrow reads each record batch from a zero-filled buffer of its full size into which the fetched ranges are
written, so the batch and the tables built from it are ordinary views; rows not fetched read as zeros and are never
served: only shards whose samples are checked on every read (their checksum column) are read this way, so a row
served unfetched would fail its check instead of passing silently. Record batches with no needed rows yet
stand in as empty rows of the right count. Once the shard's download finishes, the reader opens the cached file
instead (`reader.ShardSource.open`).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stoker import cache
from stoker.errors import ShardError
from stoker.formats.arrow_shard import footer_blocks, footer_length, select_columns, validate_batch
from stoker.formats.shard import ShardReader

HEAD = 64 << 10  # bytes read from a shard's start for its schema message, and from its end for its footer
LEAD = 64 << 10  # bytes of a record batch's body read with its metadata
LARGE = 256 << 10  # a buffer larger than this is read by rows, not whole
GAP = 16 << 10  # ranges closer than this are read as one request
PER_CALL = 10  # ranges per call of the client: obstore's `get_ranges` keeps up to 10 requests of a call in flight


class _Batch:
    """One record batch being read by ranges: its buffer (metadata, then body), the batch pyarrow reads from it,
    and which of its byte ranges and rows hold real data."""

    def __init__(self, meta: bytes, body_len: int, schema: pa.Schema, name: str, offset: int) -> None:
        self.name, self.offset = name, offset
        self.meta_len = len(meta)
        # An anonymous mapping, not the heap: zeros whose pages take memory only once written, and which go back to
        # the system whole when the batch is dropped (freed heap blocks of this size fragment a worker's heap).
        self.data = np.frombuffer(mmap.mmap(-1, max(1, self.meta_len + body_len)), np.uint8)
        self.data[:self.meta_len] = np.frombuffer(meta, np.uint8)
        try:
            self.batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(self.data)), schema)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ShardError(name, f"unreadable record batch metadata ({exc})", offset) from None
        # Per variable-width column whose values are large: (offsets, values, item size), read by rows.
        self.by_rows: list[tuple[pa.Buffer, pa.Buffer, int]] = []
        for column in self.batch.columns:
            kind = column.type
            if pa.types.is_list(kind) and pa.types.is_primitive(kind.value_type):
                values, item = column.values.buffers()[-1], kind.value_type.bit_width // 8
            elif pa.types.is_binary(kind) or pa.types.is_string(kind):
                values, item = column.buffers()[2], 1
            else:
                continue
            if values is not None and values.size > LARGE:
                self.by_rows.append((column.buffers()[1], values, item))
        large = {self._at(values) for _, values, _ in self.by_rows}
        self.whole = [(self._at(b), self._at(b) + b.size) for column in self.batch.columns for b in column.buffers()
                      if b is not None and b.size and self._at(b) not in large]
        if any(a < 0 or z > body_len for a, z in self.whole):
            raise ShardError(name, "record batch buffers lie outside its body", offset)
        self.loaded: list[tuple[int, int]] = []  # body ranges written
        self.rows = np.zeros(self.batch.num_rows, bool)  # rows whose every value is written
        self.validated = False

    def _at(self, buffer: pa.Buffer) -> int:
        return buffer.address - self.data.ctypes.data - self.meta_len

    def write(self, start: int, data: Any) -> None:
        view = np.frombuffer(data, np.uint8)
        self.data[self.meta_len + start:self.meta_len + start + len(view)] = view
        self.loaded.append((start, start + len(view)))

    def mark(self, rows: np.ndarray) -> None:
        """Record that every value of `rows` is written."""
        self.rows[rows] = True

    def _has(self, start: int, end: int) -> bool:
        return any(a <= start and end <= z for a, z in self.loaded)

    def missing(self, rows: np.ndarray) -> tuple[list[tuple[int, int]], bool]:
        """(body ranges still to read towards `rows`, whether they include all of those rows' values): the
        buffers read whole (offsets, fixed-width columns, small values), and the rows' slices of large values,
        which can be located once their offsets are read."""
        ranges = [(a, z) for a, z in self.whole if not self._has(a, z)]
        for offsets_buf, values, item in self.by_rows:
            if not self._has(self._at(offsets_buf), self._at(offsets_buf) + offsets_buf.size):
                return ranges, False
            offsets = np.frombuffer(offsets_buf, np.int32, count=len(self.rows) + 1)
            starts, ends = offsets[rows].astype(np.int64) * item, offsets[rows + 1].astype(np.int64) * item
            if len(rows) and (starts.min() < 0 or ends.max() > values.size or (ends < starts).any()):
                raise ShardError(self.name, "record batch offsets point outside its values", self.offset)
            at = self._at(values)
            ranges += [(at + a, at + z) for a, z in zip(starts.tolist(), ends.tolist()) if z > a]
        return ranges, True


class PartialShard:
    """The rows of one remote Arrow shard read so far, readable as the whole shard (`reader`)."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.schema: pa.Schema | None = None
        self.blocks: list[tuple[int, int, int]] | None = None
        self.batch_offsets: np.ndarray | None = None  # first row of each record batch, plus the row count
        self.batches: dict[int, _Batch] = {}
        self._ends: dict[str, bytes] = {}

    def requests(self, rows: np.ndarray) -> list[tuple[int, int, Callable[[Any], None]]]:
        """The next round of ranged reads towards having `rows`, as (start, end, what to do with the bytes); none
        once they are all read."""
        if self.blocks is None:  # the head (schema) and the tail (footer)
            head = (0, min(HEAD, self.size), lambda data: self._layout("head", data))
            return [head, (max(0, self.size - HEAD), self.size, lambda data: self._layout("tail", data))]
        if self.batch_offsets is None:  # every record batch's metadata: the row counts, and their first bytes
            return [(offset, offset + meta_len + min(LEAD, body_len), lambda data, b=b: self._add_batch(b, data))
                    for b, (offset, meta_len, body_len) in enumerate(self.blocks)]
        out: list[tuple[int, int, Callable[[Any], None]]] = []
        for b, local in self._wanted(rows).items():
            batch = self.batches[b]
            todo = local[~batch.rows[local]]
            if not len(todo):
                continue
            ranges, complete = batch.missing(todo)
            body = self.blocks[b][0] + self.blocks[b][1]
            for a, z in _coalesce(ranges):
                out.append((body + a, body + z, lambda data, batch=batch, a=a: batch.write(a, data)))
            if complete:  # applied after the writes above (`fetch_rows` applies a round in order)
                out.append((0, 0, lambda _, batch=batch, todo=todo: batch.mark(todo)))
        return out

    def _layout(self, end: str, data: Any) -> None:
        self._ends[end] = bytes(data)
        if len(self._ends) < 2:
            return
        head, tail = self._ends["head"], self._ends["tail"]
        footer_len = footer_length(tail[-10:], self.size, self.name)
        if footer_len + 10 > len(tail):
            raise ShardError(self.name, f"footer of {footer_len} bytes is longer than the {len(tail)} bytes read",
                             self.size - 10)
        blocks = footer_blocks(tail[len(tail) - 10 - footer_len:len(tail) - 10], self.size, self.name)
        try:
            self.schema = pa.ipc.read_schema(pa.py_buffer(head[8:]))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ShardError(self.name, f"no readable schema in its first {len(head)} bytes ({exc})", 8) from None
        self.blocks = blocks

    def _add_batch(self, b: int, data: Any) -> None:
        offset, meta_len, body_len = self.blocks[b]
        data = memoryview(data)
        batch = _Batch(bytes(data[:meta_len]), body_len, self.schema, self.name, offset)
        batch.write(0, data[meta_len:])
        self.batches[b] = batch
        if len(self.batches) == len(self.blocks):
            counts = [self.batches[i].batch.num_rows for i in range(len(self.blocks))]
            self.batch_offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def _wanted(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        if len(rows) and (rows.min() < 0 or rows.max() >= self.batch_offsets[-1]):
            raise ShardError(self.name, f"has {int(self.batch_offsets[-1])} rows; row {int(rows.max())} was asked for")
        which = np.searchsorted(self.batch_offsets, rows, side="right") - 1
        return {int(b): rows[which == b] - self.batch_offsets[b] for b in np.unique(which).tolist()}

    def reader(self) -> SparseReader:
        """The shard as a `ShardReader`: the record batches with rows read, and empty stand-ins for the others."""
        return SparseReader(self)


class SparseReader(ShardReader):
    """A `ShardReader` over a `PartialShard`: its record batches with rows read, the others as empty rows."""

    def __init__(self, shard: PartialShard) -> None:
        self.name = shard.name
        self.schema = shard.schema
        self.batch_offsets = shard.batch_offsets
        self._shard = shard

    def read_batch(self, index: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        got = self._shard.batches.get(index)
        if got is not None and got.rows.any():
            if not got.validated:
                validate_batch(self.name, got.batch, index, int(self.batch_offsets[index]))
                got.validated = True
            batch = got.batch
        else:
            rows = int(self.batch_offsets[index + 1] - self.batch_offsets[index])
            batch = pa.RecordBatch.from_arrays([_empty(field.type, rows) for field in self.schema], schema=self.schema)
        return select_columns(self.name, batch, columns)

    def close(self) -> None:
        pass


def _empty(kind: pa.DataType, rows: int) -> pa.Array:
    """`rows` empty values (b"", "", [], 0) of type `kind`, built from zeroed buffers."""
    if pa.types.is_list(kind) or pa.types.is_binary(kind) or pa.types.is_string(kind):
        offsets = pa.py_buffer(np.zeros(rows + 1, np.int32))
        if pa.types.is_list(kind):
            return pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), rows + 1, [None, offsets]),
                                            pa.array([], kind.value_type))
        return pa.Array.from_buffers(kind, rows, [None, offsets, pa.py_buffer(b"")])
    return pa.Array.from_buffers(kind, rows, [None, pa.py_buffer(np.zeros(rows * kind.bit_width // 8, np.uint8))])


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, z in sorted(ranges):
        if merged and a - merged[-1][1] <= GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], z))
        else:
            merged.append((a, z))
    return merged


def fetch_rows(wanted: dict[PartialShard, np.ndarray],
               read: Callable[[PartialShard, list[tuple[int, int]]], list[Any]], pool: cache.IOPool,
               deadline: float) -> None:
    """Read `wanted` rows of each partial shard: each round, `read(shard, spans)` calls of up to `PER_CALL` spans,
    all shards at once."""
    while True:
        round_ = []
        for shard, rows in wanted.items():
            requests = shard.requests(rows)
            spans = [(start, end) for start, end, _ in requests if end > start]
            # A call keeps at most PER_CALL requests in flight: more spans in one call would take more round trips.
            calls = [pool.submit(read, shard, spans[i:i + PER_CALL]) for i in range(0, len(spans), PER_CALL)]
            round_.append((shard, requests, calls))
        if not any(requests for _, requests, _ in round_):
            return
        try:
            for shard, requests, calls in round_:
                got = (data for call in calls for data in cache.wait(call, deadline, f"rows of shard {shard.name}"))
                for start, end, apply in requests:  # in order: a batch's writes before its rows are marked read
                    apply(next(got) if end > start else b"")
        finally:
            for _, _, calls in round_:
                for call in calls:
                    call.cancel()
