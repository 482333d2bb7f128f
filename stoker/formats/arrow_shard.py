"""Arrow IPC *file* shards: one row per sample, record batches of a few MB, readable by any Arrow tool.

Byte layout is the standard Arrow IPC file format (magic `ARROW1`, schema, record batches, footer with batch
offsets), so a shard opens with `pyarrow.ipc.open_file`, `polars.read_ipc` or DuckDB's arrow extension.
Local shards are memory-mapped: column buffers handed out are views of the page cache, not copies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stoker.errors import ShardError
from stoker.formats.shard import ShardFormat, ShardReader, ShardSource, ShardWriter, register_format, samples_to_batch


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

    def __init__(self, source: ShardSource, *, name: str) -> None:
        self.name = name
        if isinstance(source, (str, os.PathLike)):
            self._source: Any = pa.memory_map(os.fspath(source), "r")
        elif isinstance(source, (bytes, memoryview, pa.Buffer)):
            self._source = pa.BufferReader(source)
        else:
            self._source = pa.PythonFile(source, mode="r")
        try:
            self._reader = pa.ipc.open_file(self._source)
            # Batches of a memory map or buffer are zero-copy views: keep the ones read to count rows.
            self._batches = [self._reader.get_batch(i) for i in range(self._reader.num_record_batches)]
            rows = [b.num_rows for b in self._batches]
            self.schema = self._reader.schema
            self.schema.names  # field names that are not UTF-8 fail here, not in the caller
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            self.close()
            raise ShardError(name, f"not a readable Arrow IPC file ({exc})", 0) from None
        self.batch_offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])

    def read_batch(self, index: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"{self.name}: batch {index} out of range 0..{self.num_batches - 1}")
        try:
            batch = self._batches[index]
            # Forged offsets or lengths must become an error here, not a crash or a giant allocation later.
            batch.validate(full=True)
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(self.name, f"record batch {index} is corrupt ({exc})", row=int(self.batch_offsets[index])) from None
        if columns is not None:
            missing = [c for c in columns if c not in batch.schema.names]
            if missing:
                raise ShardError(self.name, f"no column(s) {missing}; the shard has {batch.schema.names}")
            batch = batch.select(list(columns))
        return batch

    def close(self) -> None:
        self._batches = []
        source = getattr(self, "_source", None)
        if source is not None:
            source.close()


register_format(ShardFormat("arrow", ".arrow", b"ARROW1", ArrowShardReader, ArrowShardWriter))
