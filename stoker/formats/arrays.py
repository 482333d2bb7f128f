"""Arrow arrays as numpy views, without pandas: what readers and the checksum check both build their rows from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def arrow_to_numpy(array: pa.Array) -> np.ndarray:
    """The values of a fixed-width Arrow array as a read-only numpy view (copied only if it has nulls).

    Not `Array.to_numpy`: it imports pandas on first use when pandas is installed (see shard.numpy_to_arrow).
    """
    if array.null_count or not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(array.type.to_pandas_dtype())
    # `count`: a buffer may be longer than its values (validated shards guarantee only that it is long enough).
    return np.frombuffer(array.buffers()[1], dtype, count=array.offset + len(array))[array.offset:]


def column_view(column: pa.Array) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A fixed-width column's values, or a variable-width one's (offsets as int64, n + 1 of them, values): row i of
    strings and bytes is values[offsets[i]:offsets[i + 1]] in bytes, of lists in values (tokens). No copy of the
    values."""
    if pa.types.is_list(column.type):
        return arrow_to_numpy(column.offsets).astype(np.int64), arrow_to_numpy(column.values)
    if pa.types.is_binary(column.type) or pa.types.is_string(column.type):
        offsets = np.frombuffer(column.buffers()[1], np.int32, count=column.offset + len(column) + 1)[column.offset:]
        data = column.buffers()[2]
        values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        return offsets.astype(np.int64), values
    return arrow_to_numpy(column)
