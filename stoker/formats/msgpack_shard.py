"""msgpack shards: the same records as the Arrow shards, with an offset index for O(1) access to any row.

Byte layout (all integers little-endian)::

    0        8 bytes  magic b"STKMSGP1"
    8        4 bytes  u32 header length H, then H bytes: msgpack map {"version": 1, "fields": {name: arrow type}}
    ...      records: one msgpack map per sample, back to back (token ids stored as raw little-endian bytes)
    T        trailer: msgpack map {"offsets": bytes of u64[rows + 1], "batches": bytes of u64[batches + 1]}
    end-24   footer: u64 trailer offset T, u64 trailer length, magic b"STKMIDX1"

`offsets[i]:offsets[i+1]` is the byte range of row i; `batches` holds the first row of each record batch.
Every offset is checked against the file size before use, so a forged index cannot cause a large allocation.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa

from stoker.errors import ShardError
from stoker.formats.conform import arrow_type
from stoker.formats.shard import ShardFormat, ShardReader, ShardInput, ShardWriter, register_format, samples_to_batch

MAGIC = b"STKMSGP1"
FOOTER_MAGIC = b"STKMIDX1"
_FOOTER = struct.Struct("<QQ8s")
VERSION = 1
MAX_FIELDS = 64
# What the unpacker can build besides scalars within its limits (no entries in arrays or ext types): never a value.
_NOT_SCALARS = frozenset({dict, list, msgpack.ExtType})


class MsgpackShardWriter(ShardWriter):
    """Writes a msgpack shard with an offset index."""

    def __init__(self, path: str, schema: pa.Schema, *, batch_bytes: int = 4 << 20) -> None:
        super().__init__(path, schema, batch_bytes=batch_bytes)
        header = msgpack.packb({"version": VERSION, "fields": {f.name: str(f.type) for f in schema}})
        self._pos = 0
        self._offsets: list[int] = []
        self._batches: list[int] = [0]
        self._put(MAGIC + struct.pack("<I", len(header)) + header)
        self._packer = msgpack.Packer()

    def _put(self, data: bytes) -> None:
        self._write(data)
        self._pos += len(data)

    def _write_samples(self, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            record = {}
            for name in self.schema.names:
                value = sample[name]
                record[name] = value.tobytes() if isinstance(value, np.ndarray) else value
            self._offsets.append(self._pos)
            self._put(self._packer.pack(record))
        self._batches.append(self._batches[-1] + len(samples))

    def _finish(self) -> None:
        offsets = np.asarray(self._offsets + [self._pos], "<u8")
        trailer = msgpack.packb({"offsets": offsets.tobytes(), "batches": np.asarray(self._batches, "<u8").tobytes()})
        start = self._pos
        self._put(trailer)
        self._put(_FOOTER.pack(start, len(trailer), FOOTER_MAGIC))


class MsgpackShardReader(ShardReader):
    """Reads a msgpack shard through its offset index; local files are memory-mapped."""

    def __init__(self, source: ShardInput, *, name: str) -> None:
        self.name = name
        self._mmap: mmap.mmap | None = None
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._data = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")
        elif isinstance(source, (bytes, memoryview, pa.Buffer)):
            self._data = memoryview(source)
        else:
            self._data = memoryview(source.read())
        self._parse()

    def _fail(self, message: str, offset: int | None = None, row: int | None = None) -> ShardError:
        return ShardError(self.name, message, offset, row=row)

    def _parse(self) -> None:
        data, size = self._data, len(self._data)
        if size < len(MAGIC) + 4 + _FOOTER.size or bytes(data[:8]) != MAGIC:
            raise self._fail("not a stoker msgpack shard (bad magic or too short; truncated?)", 0)
        trailer_at, trailer_len, magic = _FOOTER.unpack(data[size - _FOOTER.size:])
        if magic != FOOTER_MAGIC:
            raise self._fail("footer magic missing: the shard is truncated or was not finished", size - _FOOTER.size)
        if trailer_at + trailer_len != size - _FOOTER.size:
            raise self._fail("footer points outside the file", size - _FOOTER.size)
        (header_len,) = struct.unpack("<I", data[8:12])
        if 12 + header_len > trailer_at:
            raise self._fail("header length runs past the records", 8)
        try:
            header = _unpack(data, 12, 12 + header_len, MAX_FIELDS, nested=("fields",))
            trailer = _unpack(data, trailer_at, trailer_at + trailer_len, 2)
            fields = header["fields"]
            if not isinstance(fields, dict) or not all(isinstance(t, str) for t in fields.values()):
                raise TypeError("fields is not a map of name -> type")
            offsets = np.frombuffer(trailer["offsets"], "<u8")
            batches = np.frombuffer(trailer["batches"], "<u8")
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise self._fail(f"unreadable header or index ({exc})", 8) from None
        if header.get("version") != VERSION:
            raise self._fail(f"msgpack shard version {str(header.get('version'))[:40]!r} is not supported", 12)
        if len(offsets) and (offsets.max() > size or batches.max(initial=0) > size):
            raise self._fail("offset index points past the end of the file", trailer_at)
        offsets, batches = offsets.astype(np.int64), batches.astype(np.int64)
        rows = len(offsets) - 1
        if (
            rows < 0
            or offsets[0] != 12 + header_len
            or offsets[-1] != trailer_at
            or np.any(np.diff(offsets) <= 0)
            or len(batches) < 1
            or batches[0] != 0
            or batches[-1] != rows
            or np.any(np.diff(batches) < 0)
        ):
            raise self._fail("offset index is inconsistent with the file", trailer_at)
        self._offsets = offsets
        self.batch_offsets = batches
        self.schema = pa.schema([pa.field(n, arrow_type(t, self.name), nullable=False) for n, t in fields.items()])
        # Per field: (name, Python type of its msgpack value, int range, bytes per token id for token columns)
        self._fields = [_field_check(f) for f in self.schema]

    def _record(self, row: int) -> dict[str, Any]:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        try:
            record = _unpack(self._data, start, end, len(self._fields))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise self._fail(f"record {row} is corrupt ({exc})", start, row) from None
        if len(record) != len(self._fields):
            raise self._fail(f"record {row} does not have the fields {self.schema.names}", start, row)
        for name, python, low, high, width in self._fields:
            value = record.get(name, record)  # the record itself as a value of no field's type: missing
            if type(value) is not python or (python is int and not low <= value <= high):
                raise self._fail(f"record {row}: {self._wrong(name, value)}", start, row)
            if width:
                if len(value) % width:
                    raise self._fail(f"record {row}: field {name!r} is not a packed integer array", start, row)
                record[name] = np.frombuffer(value, f"<u{width}")
        return record

    def _wrong(self, name: str, value: Any) -> str:
        declared = self.schema.field(name).type
        if type(value) is dict:
            return f"field {name!r} is missing"
        if type(value) is int:
            return f"field {name!r} value {value} does not fit {declared}"
        return f"field {name!r} holds {type(value).__name__} {str(value)[:40]!r}, not {declared}"

    def read_batch(self, index: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"{self.name}: batch {index} out of range 0..{self.num_batches - 1}")
        first, last = int(self.batch_offsets[index]), int(self.batch_offsets[index + 1])
        records = [self._record(r) for r in range(first, last)]
        try:
            batch = samples_to_batch(records, self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise self._fail(f"record batch {index} has values of the wrong type ({exc})", int(self._offsets[first]), first) from None
        return batch if columns is None else batch.select(list(columns))

    def _take(self, rows: np.ndarray, columns: Sequence[str] | None) -> pa.Table:
        # Rows one by one through the offset index (ShardReader.take checks the range and the checksums).
        batch = samples_to_batch([self._record(int(r)) for r in rows], self.schema)
        return pa.Table.from_batches([batch if columns is None else batch.select(list(columns))])

    def close(self) -> None:
        self._data.release()
        self._data = memoryview(b"")
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None


def _field_check(field: pa.Field) -> tuple[str, type, int, int, int]:
    type_ = field.type
    if pa.types.is_list(type_):
        return field.name, bytes, 0, 0, type_.value_type.bit_width // 8
    if pa.types.is_integer(type_):
        bits = type_.bit_width
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pa.types.is_signed_integer(type_) else (0, (1 << bits) - 1)
        return field.name, int, low, high, 0
    return field.name, str if pa.types.is_string(type_) else bytes, 0, 0, 0


def _flat(pairs: dict[Any, Any]) -> dict[Any, Any]:
    for value in pairs.values():
        if type(value) in _NOT_SCALARS:
            raise TypeError("a nested map or array where a value belongs")
    return pairs


def _unpack(data: memoryview, start: int, end: int, max_entries: int, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """The msgpack map in data[start:end], of at most `max_entries` scalar values (maps only under the keys `nested`).
    No arrays, no ext types, and a map where none belongs fails as soon as it is built: input of N bytes never
    builds more than a few small maps, whatever it claims."""
    def flat_but_nested(pairs: dict[Any, Any]) -> dict[Any, Any]:
        if any(type(v) in _NOT_SCALARS and k not in nested for k, v in pairs.items()):
            raise TypeError("a nested map or array where a value belongs")
        return pairs

    view = data[start:end]
    try:
        # _flat, not a closure, for records: this runs once per sample read.
        record = msgpack.unpackb(view, max_map_len=max_entries, max_array_len=0, max_ext_len=0,
                                 object_hook=flat_but_nested if nested else _flat)
    finally:
        view.release()  # an error's traceback keeps this frame: the file's map must still be closable
    if type(record) is not dict:
        raise TypeError(f"expected a map, found {type(record).__name__}")
    return record


register_format(ShardFormat("msgpack", ".msgpack", MAGIC, MsgpackShardReader, MsgpackShardWriter))
