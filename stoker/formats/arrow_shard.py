"""Arrow IPC *file* shards: one row per sample, record batches of a few MB, readable by any Arrow tool.

Byte layout is the standard Arrow IPC file format (magic `ARROW1`, schema, record batches, footer with batch
offsets), so a shard opens with `pyarrow.ipc.open_file`, `polars.read_ipc` or DuckDB's arrow extension.
Local shards are memory-mapped: column buffers handed out are views of the page cache, not copies.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stoker.errors import ShardError
from stoker.formats.shard import ShardFormat, ShardReader, ShardInput, ShardWriter, register_format, samples_to_batch


class _HashingSink:
    """File-like object for pyarrow that forwards every write to the writer (which hashes it)."""

    def __init__(self, write: Any) -> None:
        self._write = write
        self._pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._write(view)
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


class ArrowShardWriter(ShardWriter):
    """Writes an Arrow IPC file shard."""

    def __init__(self, path: str, schema: pa.Schema, *, batch_bytes: int = 4 << 20) -> None:
        super().__init__(path, schema, batch_bytes=batch_bytes)
        self._sink = pa.PythonFile(_HashingSink(self._write), mode="w")
        self._ipc = pa.ipc.new_file(self._sink, schema)

    def _write_samples(self, samples: list[dict[str, Any]]) -> None:
        self._ipc.write_batch(samples_to_batch(samples, self.schema))

    def _finish(self) -> None:
        self._ipc.close()


class ArrowShardReader(ShardReader):
    """Reads an Arrow IPC file shard; local files are memory-mapped."""

    def __init__(self, source: ShardInput, *, name: str) -> None:
        self.name = name
        if isinstance(source, (str, os.PathLike)):
            self._source: Any = pa.memory_map(os.fspath(source), "r")
        elif isinstance(source, (bytes, memoryview, pa.Buffer)):
            self._source = pa.BufferReader(source)
        else:
            self._source = pa.PythonFile(source, mode="r")
        try:
            _check_layout(self._source, name)
            self._reader = pa.ipc.open_file(self._source)
            # Batches of a memory map or buffer are zero-copy views: keep the ones read to count rows.
            self._batches = [self._reader.get_batch(i) for i in range(self._reader.num_record_batches)]
            rows = [b.num_rows for b in self._batches]
            self.schema = self._reader.schema
            self.schema.names  # field names that are not UTF-8 fail here, not in the caller
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            self.close()
            raise ShardError(name, f"not a readable Arrow IPC file ({exc})", 0) from None
        except ShardError:
            self.close()
            raise
        self.batch_offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])

    def read_batch(self, index: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"{self.name}: batch {index} out of range 0..{self.num_batches - 1}")
        batch = self._batches[index]
        validate_batch(self.name, batch, index, int(self.batch_offsets[index]))
        return select_columns(self.name, batch, columns)

    def close(self) -> None:
        self._batches = []
        source = getattr(self, "_source", None)
        if source is not None:
            source.close()


def validate_batch(name: str, batch: pa.RecordBatch, index: int, first_row: int) -> None:
    """A ShardError naming record batch `index` of shard `name` unless every offset and length in it is sound."""
    try:
        # Forged offsets or lengths must become an error here, not a crash or a giant allocation later.
        batch.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(name, f"record batch {index} is corrupt ({exc})", row=first_row) from None


def select_columns(name: str, batch: pa.RecordBatch, columns: Sequence[str] | None) -> pa.RecordBatch:
    """`batch` with only `columns` (all of them if None); a ShardError if the shard lacks one."""
    if columns is None:
        return batch
    missing = [c for c in columns if c not in batch.schema.names]
    if missing:
        raise ShardError(name, f"no column(s) {missing}; the shard has {batch.schema.names}")
    return batch.select(list(columns))


def _check_layout(source: Any, name: str) -> None:
    """A ShardError unless every record batch the file's footer lists is uncompressed and there are no dictionary
    batches, read from the flatbuffers before pyarrow decodes anything.

    stoker writes neither. A compressed batch is inflated whole the moment it is read: 65 KB of zstd can claim
    gigabytes. So refusing it here bounds a reader's memory by the file's size.
    """
    size = source.size()
    footer_len = footer_length(_read(source, size - 10, 10) if size >= 18 else b"", size, name)
    blocks = footer_blocks(_read(source, size - 10 - footer_len, footer_len), size, name)
    try:
        for i, (offset, meta_len, _) in enumerate(blocks):
            message = _read(source, offset, meta_len)
            skip = 8 if _u32(message, 0) == 0xFFFFFFFF else 4  # continuation marker, then the length
            message = message[skip:]
            header = _table(message, _u32(message, 0))
            if _field(message, header, 1, "B") != 3:  # MessageHeader.RecordBatch
                raise ShardError(name, f"block {i} is not a record batch", offset)
            batch = _table(message, _deref(message, header, 2))
            if _field_pos(message, batch, 3) is not None:  # RecordBatch.compression
                raise ShardError(name, f"record batch {i} is compressed; stoker reads uncompressed shards only "
                                 "(a compressed batch is inflated whole, whatever it claims)", offset)
    except ShardError:  # a ValueError too: it already says what is wrong, and where
        raise
    except (struct.error, IndexError, ValueError) as exc:
        raise ShardError(name, f"unreadable Arrow message ({exc})", size - 10 - footer_len) from None


def footer_length(last10: bytes, size: int, name: str) -> int:
    """The footer's length, from the last 10 bytes of an Arrow IPC file of `size` bytes (a ShardError if they are
    not an Arrow file's end)."""
    if len(last10) != 10 or last10[4:] != b"ARROW1":
        raise ShardError(name, "not an Arrow IPC file (no ARROW1 footer; truncated?)", max(size - 10, 0))
    (footer_len,) = struct.unpack("<i", last10[:4])
    if not 0 < footer_len <= size - 18:
        raise ShardError(name, f"footer length {footer_len} does not fit the file", size - 10)
    return footer_len


def footer_blocks(footer: bytes, size: int, name: str) -> list[tuple[int, int, int]]:
    """(offset, metadata length, body length) of each record batch the footer lists, each within the file; a
    ShardError if the footer is unreadable or lists dictionary batches."""
    at = size - 10 - len(footer)
    try:
        root = _table(footer, _u32(footer, 0))
        if _vector(footer, root, 2)[1]:
            raise ShardError(name, "has dictionary batches; stoker's shards have none", at)
        start, count = _vector(footer, root, 3)
        blocks = [struct.unpack_from("<qi4xq", footer, start + 24 * i) for i in range(count)]
    except ShardError:  # a ValueError too: it already says what is wrong, and where
        raise
    except (struct.error, IndexError, ValueError) as exc:
        raise ShardError(name, f"unreadable Arrow footer ({exc})", at) from None
    for i, (offset, meta_len, body_len) in enumerate(blocks):
        if not 8 <= offset <= size - 8 or not 8 <= meta_len <= size - offset or not 0 <= body_len <= size - offset - meta_len:
            raise ShardError(name, f"record batch {i} lies outside the file", offset)
    return blocks


def _read(source: Any, offset: int, length: int) -> bytes:
    source.seek(offset)
    return source.read(length)


# Minimal flatbuffer access (https://flatbuffers.dev/internals): a table starts with an int32 offset back to its
# vtable; the vtable lists u16 offsets of each field from the table start (0: absent).
def _u32(buf: bytes, at: int) -> int:
    if at < 0:
        raise ValueError(f"offset {at} before the buffer")
    return struct.unpack_from("<I", buf, at)[0]


def _table(buf: bytes, at: int) -> tuple[int, int, int]:
    vtable = at - struct.unpack_from("<i", buf, at)[0]
    if vtable < 0:
        raise ValueError("vtable before the buffer")
    return at, vtable, struct.unpack_from("<H", buf, vtable)[0]


def _field_pos(buf: bytes, table: tuple[int, int, int], index: int) -> int | None:
    at, vtable, vtable_size = table
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return at + offset if offset else None


def _field(buf: bytes, table: tuple[int, int, int], index: int, fmt: str) -> int:
    pos = _field_pos(buf, table, index)
    return 0 if pos is None else struct.unpack_from("<" + fmt, buf, pos)[0]


def _deref(buf: bytes, table: tuple[int, int, int], index: int) -> int:
    pos = _field_pos(buf, table, index)
    if pos is None:
        raise ValueError(f"field {index} missing")
    return pos + _u32(buf, pos)


def _vector(buf: bytes, table: tuple[int, int, int], index: int) -> tuple[int, int]:
    """(first element's position, length) of a vector field; (0, 0) when absent."""
    if _field_pos(buf, table, index) is None:
        return 0, 0
    at = _deref(buf, table, index)
    return at + 4, _u32(buf, at)


register_format(ShardFormat("arrow", ".arrow", b"ARROW1", ArrowShardReader, ArrowShardWriter))
