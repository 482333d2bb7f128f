"""The two sample schemas (images and tokenized text) shared by every shard format and the manifest.

Both end with the per-sample checksum column of `stoker.formats.integrity` (format version 2).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

from stoker.errors import ConfigError
from stoker.formats.integrity import with_checksum

Kind = Literal["image", "text"]
FORMAT_VERSION = 2  # 2: every sample carries a checksum (stoker.formats.integrity)
READABLE_VERSIONS = (1, 2)  # 1: no checksums, read unchecked with one warning


def token_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; unknown vocabularies get uint32."""
    if vocab_size is not None and vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def image_schema() -> pa.Schema:
    """Arrow schema of an image shard: encoded bytes are stored as they came, never re-decoded."""
    return with_checksum(pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
        ]
    ))


def text_schema(dtype: np.dtype) -> pa.Schema:
    """Arrow schema of a text shard: token ids as list<uint16|uint32> plus their count."""
    return with_checksum(pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype)), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
        ]
    ))


def schema_for(kind: Kind, dtype: np.dtype | None = None) -> pa.Schema:
    """Return the Arrow schema of `kind` ("image" or "text")."""
    if kind == "image":
        return image_schema()
    if kind == "text":
        return text_schema(np.dtype(dtype or np.uint32))
    raise ConfigError(f"unknown dataset kind {kind!r}: expected 'image' or 'text'")


def describe(schema: pa.Schema) -> dict[str, str]:
    """Field name -> Arrow type string, as recorded in the manifest."""
    return {f.name: str(f.type) for f in schema}
