"""Small packed datasets for the dataloader tests, written with the format layer directly.

Sample i (global index, manifest order) has key f"{i:06d}" and label i % 10, so tests can check exactly-once
delivery and order from the keys alone. Image payloads are random bytes whose first 6 bytes repeat the key.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np

from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.schema import describe, image_schema, text_schema
from stoker.formats.shard import SUFFIX, create_writer


def make_dataset(
    root: str | os.PathLike[str],
    rows: Sequence[int] = (40, 40, 40, 40),
    *,
    kind: str = "image",
    fmt: str = "arrow",
    batch_bytes: int = 4096,
    payload: tuple[int, int] = (50, 400),
    seed: int = 0,
) -> str:
    """Write a dataset with len(rows) shards of the given row counts into `root`; return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = image_schema() if kind == "image" else text_schema(np.dtype(np.uint16))
    shards, index = [], 0
    for s, count in enumerate(rows):
        name = f"shard-{s:05d}{SUFFIX[fmt]}"
        writer = create_writer(fmt, str(root / name), schema, batch_bytes=batch_bytes)
        lengths = []
        for _ in range(count):
            key = f"{index:06d}"
            size = int(rng.integers(*payload))
            if kind == "image":
                body = key.encode() + rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                writer.add({"key": key, "label": index % 10, "image": body, "height": size % 97 + 1, "width": 7})
            else:
                tokens = np.full(size % 60 + 1, index % 65536, dtype=np.uint16)
                lengths.append(len(tokens))
                writer.add({"key": key, "tokens": tokens, "length": len(tokens)})
            index += 1
        n, nbytes, sha = writer.close()
        lengths_arr = np.asarray(lengths, np.uint32) if kind == "text" else None
        shards.append(ShardInfo(name, n, nbytes, sha, lengths_arr))
    manifest = Manifest(
        kind=kind,
        format=fmt,
        schema=describe(schema),
        shards=tuple(shards),
        classes=tuple(f"class_{i}" for i in range(10)) if kind == "image" else (),
        token_dtype="uint16" if kind == "text" else None,
    )
    manifest.save(str(root))
    return str(root)


def keys_of(batches: Sequence[dict]) -> list[str]:
    """All keys of a list of collated batches, in order."""
    return [k for b in batches for k in b["key"]]


def to_memory(local: str | os.PathLike[str]) -> str:
    """Copy a dataset's files to a fresh fsspec memory:// prefix (a remote source without a server); return its URL."""
    fs = fsspec.filesystem("memory")
    url = f"memory://stoker-{uuid.uuid4().hex[:8]}/ds"
    for path in Path(local).iterdir():
        fs.pipe(url + "/" + path.name, path.read_bytes())
    return url
