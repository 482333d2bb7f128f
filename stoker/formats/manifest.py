"""The manifest: the one file that says what a packed dataset holds.

It is written last and atomically, so its presence means every shard it lists is complete. Layout (JSON)::

    {"format_version": 2, "kind": "image"|"text", "format": "arrow"|"msgpack",
     "schema": {field: arrow type}, "classes": [...], "vocab_size": int|null, "token_dtype": "uint16"|"uint32"|null,
     "tokenizer": str|null,
     "shards": [{"name", "rows", "bytes", "sha256", "lengths": base64 of little-endian uint32 | null}],
     "skipped": [{"path", "error"}], "options": {...}, "checksum": sha256 of the rest}
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from stoker.errors import ManifestError
from stoker.formats.schema import FORMAT_VERSION, READABLE_VERSIONS

MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    rows: int
    bytes: int
    sha256: str
    lengths: np.ndarray | None = None  # per-sample token counts, text only

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256, "lengths": None}
        if self.lengths is not None:
            data["lengths"] = base64.b64encode(np.asarray(self.lengths, "<u4").tobytes()).decode("ascii")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        name = str(data["name"])
        _check_shard_name(name)
        lengths = None
        if data.get("lengths") is not None:
            lengths = np.frombuffer(base64.b64decode(data["lengths"]), "<u4").astype(np.uint32)
            if len(lengths) != int(data["rows"]):
                raise ManifestError(f"shard {name}: {len(lengths)} lengths recorded for {data['rows']} rows")
        rows, size, sha256 = int(data["rows"]), int(data["bytes"]), str(data["sha256"])
        if rows < 0 or size < 0:
            raise ManifestError(f"shard {name}: negative rows ({rows}) or bytes ({size})")
        if not _SHA256.fullmatch(sha256):
            # The checksum names the shard's cache file: it must not be able to point anywhere else.
            raise ManifestError(f"shard {name}: sha256 {sha256[:80]!r} is not 64 lowercase hex digits")
        return cls(name, rows, size, sha256, lengths)


def _check_shard_name(name: str) -> None:
    # A manifest from elsewhere must not point a reader outside the dataset's own directory or prefix.
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..") or ":" in name:
        raise ManifestError(f"shard name {name!r} is not a plain file name inside the dataset directory")


@dataclass(frozen=True)
class Manifest:
    """What a packed dataset holds: kind, format, schema, classes and the shards with their checksums."""

    kind: str
    format: str
    schema: dict[str, str]
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] = ()
    vocab_size: int | None = None
    token_dtype: str | None = None
    tokenizer: str | None = None
    skipped: tuple[dict[str, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        """Total number of samples over all shards."""
        return int(sum(s.rows for s in self.shards))

    @property
    def num_bytes(self) -> int:
        """Total size of all shards in bytes."""
        return int(sum(s.bytes for s in self.shards))

    @cached_property
    def shard_offsets(self) -> np.ndarray:
        """Global index of each shard's first sample, plus the total at the end (length shards+1)."""
        return np.concatenate([[0], np.cumsum([s.rows for s in self.shards], dtype=np.int64)])

    @cached_property
    def lengths(self) -> np.ndarray:
        """Per-sample token counts in global sample order (text datasets only)."""
        if self.kind != "text":
            raise ManifestError(f"lengths exist only for text datasets; this one holds {self.kind}")
        parts = [s.lengths for s in self.shards if s.lengths is not None]
        if len(parts) != len(self.shards):
            raise ManifestError("some shards of this text dataset have no recorded lengths")
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def locate(self, index: int) -> tuple[int, int]:
        """Map a global sample index to (shard number, row in shard)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for a dataset of {self.num_samples}")
        shard = int(np.searchsorted(self.shard_offsets, index, side="right")) - 1
        return shard, int(index - self.shard_offsets[shard])

    def to_dict(self) -> dict[str, Any]:
        body = {
            "format_version": self.format_version,
            "kind": self.kind,
            "format": self.format,
            "schema": dict(self.schema),
            "classes": list(self.classes),
            "vocab_size": self.vocab_size,
            "token_dtype": self.token_dtype,
            "tokenizer": self.tokenizer,
            "shards": [s.to_json() for s in self.shards],
            "skipped": [dict(s) for s in self.skipped],
            "options": dict(self.options),
        }
        body["checksum"] = _checksum(body)
        return body

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def loads(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest; `source` names it in errors."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(f"{source}: format version {version!r} is not supported (this stoker reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
        expected = data.pop("checksum", None)
        if expected != _checksum(data):
            raise ManifestError(f"{source}: checksum mismatch; the manifest was edited or damaged")
        try:
            return cls(
                kind=data["kind"],
                format=data["format"],
                schema=dict(data["schema"]),
                shards=tuple(ShardInfo.from_json(s) for s in data["shards"]),
                classes=tuple(data.get("classes") or ()),
                vocab_size=data.get("vocab_size"),
                token_dtype=data.get("token_dtype"),
                tokenizer=data.get("tokenizer"),
                skipped=tuple(data.get("skipped") or ()),
                options=dict(data.get("options") or {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"{source}: malformed manifest ({exc!r})") from None

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
        """Read the manifest of the dataset at `url` (a directory or the manifest file itself)."""
        from stoker import storage

        path = url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)
        try:
            text = storage.read_bytes(path, storage_options)
        except FileNotFoundError:
            raise ManifestError(
                f"{storage.redact(path)}: no manifest; is this a packed dataset, and did `pack-dataset` finish?"
            ) from None
        return cls.loads(text, storage.redact(path))

    def save(self, url: str, storage_options: dict[str, Any] | None = None, *, name: str = MANIFEST_NAME) -> None:
        """Write the manifest (`manifest.json` unless named) into the dataset directory `url`, atomically."""
        from stoker import storage

        storage.write_bytes_atomic(storage.join(url, name), self.dumps().encode(), storage_options)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
