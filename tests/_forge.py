"""Forging datasets as a hostile author would: shards rewritten at will, the manifest re-signed to match."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa

from stoker.formats import integrity
from stoker.formats.manifest import _checksum
from stoker.formats.schema import image_schema as stoker_image_schema
from stoker.formats.msgpack_shard import FOOTER_MAGIC, MAGIC


def resign(root: str | Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit manifest.json's JSON and re-sign it (the checksum has no key)."""
    path = Path(root) / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    edit(body)
    body["checksum"] = _checksum(body)
    path.write_text(json.dumps(body))


def install(root: str | Path, name: str, data: bytes, rows: int | None = None) -> None:
    """Replace shard `name` with `data` and make the manifest agree with its size, checksum (and rows)."""
    (Path(root) / name).write_bytes(data)

    def edit(body: dict[str, Any]) -> None:
        for shard in body["shards"]:
            if shard["name"] == name:
                shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                if rows is not None:
                    shard["rows"] = rows

    resign(root, edit)


def arrow_file(schema: pa.Schema, batches: Sequence[Sequence[pa.Array]], compression: str | None = None) -> bytes:
    """An Arrow IPC file with `schema` (taken as given: any type, nullability or metadata) and these columns."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        for columns in batches:
            writer.write_batch(pa.RecordBatch.from_arrays(list(columns), schema=schema))
    return sink.getvalue().to_pybytes()


def image_columns(rows: int, image: pa.Array | None = None, label: pa.Array | None = None, *,
                  digests: bool = True) -> list[pa.Array]:
    """key, label, image, height, width and checksum columns of `rows` image samples (labels 0.., tiny payloads);
    each sample's checksum is computed as the packer would (forgers can: it has no key), or 0 without `digests`."""
    columns = [
        pa.array([f"{i:06d}" for i in range(rows)], pa.string()),
        label if label is not None else pa.array(np.arange(rows) % 10, pa.int32()),
        image if image is not None else pa.array([b"img%d" % i for i in range(rows)], pa.binary()),
        pa.array(np.ones(rows), pa.int32()),
        pa.array(np.ones(rows), pa.int32()),
    ]
    sums = [0] * rows
    if digests:
        names = ["key", "label", "image", "height", "width"]
        for i in range(rows):
            sample = {n: c[i].as_py() for n, c in zip(names, columns)}
            if None not in sample.values():
                sums[i] = integrity.digest_sample(sample, stoker_image_schema())
    return columns + [pa.array(sums, pa.uint64())]


def image_schema(**types: pa.DataType) -> pa.Schema:
    """stoker's image schema (checksum column last) with some field types replaced."""
    base = {"key": pa.string(), "label": pa.int32(), "image": pa.binary(), "height": pa.int32(), "width": pa.int32(),
            integrity.COLUMN: pa.uint64()}
    base.update(types)
    return pa.schema([pa.field(n, t, nullable=False) for n, t in base.items()])


def msgpack_shard(header: bytes, records: Sequence[bytes]) -> bytes:
    """A stoker msgpack shard from a raw (already packed) header and raw records, index and footer computed."""
    out = bytearray(MAGIC + struct.pack("<I", len(header)) + header)
    offsets = []
    for record in records:
        offsets.append(len(out))
        out += record
    offsets.append(len(out))
    trailer = msgpack.packb({"offsets": np.asarray(offsets, "<u8").tobytes(),
                             "batches": np.asarray([0, len(records)], "<u8").tobytes()})
    start = len(out)
    out += trailer + struct.pack("<QQ8s", start, len(trailer), FOOTER_MAGIC)
    return bytes(out)


IMAGE_FIELDS = {"key": "string", "label": "int32", "image": "binary", "height": "int32", "width": "int32",
                integrity.COLUMN: "uint64"}


def image_record(i: int) -> dict[str, Any]:
    """One msgpack image record with its checksum."""
    record = {"key": f"{i:06d}", "label": i % 10, "image": b"img", "height": 1, "width": 1}
    return {**record, integrity.COLUMN: integrity.digest_sample(record, stoker_image_schema())}


def flip_sample_byte(path: str | Path, key: str, delta: int, mask: int = 0x01) -> None:
    """Flip one bit of the stored image (or token) bytes of sample `key`: `make_dataset` starts each image with its
    key, so the second occurrence of the key in the file lies in that sample's value (the first is the key field)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    first = data.index(key.encode())
    data[data.index(key.encode(), first + len(key)) + delta] ^= mask
    path.write_bytes(bytes(data))


def read_both(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every sample as StreamingDataset (the catalog gather, in order) and ShardDataset (map-style gather) return
    them."""
    from stoker import ShardDataset, StreamingDataset

    stream = list(StreamingDataset(str(root), shuffle=False))
    ds = ShardDataset(str(root))
    return stream, ds.__getitems__(list(range(len(ds))))
