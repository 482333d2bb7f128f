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
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Callable
from typing import Any

import numpy as np

from stoker.errors import ConfigError, ManifestError
from stoker.formats.conform import Rules, check_manifest_fields
from stoker.formats.schema import FORMAT_VERSION, READABLE_VERSIONS
from stoker.names import unsafe_name

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # default cap on a manifest's size; STOKER_MAX_MANIFEST_BYTES overrides it
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_COUNT = 1 << 62  # rows and bytes stay far from int64 overflow in every sum and offset


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
        if not isinstance(data, dict):
            raise ManifestError(f"shard entry {str(data)[:80]!r} is not a JSON object")
        name = data.get("name")
        if not isinstance(name, str):
            raise ManifestError(f"shard name {str(name)[:80]!r} is not a string")
        _check_shard_name(name)
        rows, size, sha256 = data.get("rows"), data.get("bytes"), data.get("sha256")
        for what, value in (("rows", rows), ("bytes", size)):
            if not _is_int(value):
                raise ManifestError(f"shard {name}: {what} {str(value)[:40]!r} is not an integer")
            if not 0 <= value < _MAX_COUNT:
                raise ManifestError(f"shard {name}: negative {what} ({value}) or more than 2**62")
        if rows > size:
            # Every format spends at least one byte per row: a larger claim would size plans by a number the
            # file cannot back.
            raise ManifestError(f"shard {name}: {rows} rows cannot fit in {size} bytes")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            # The checksum names the shard's cache file: it must not be able to point anywhere else.
            raise ManifestError(f"shard {name}: sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits")
        lengths = None
        if data.get("lengths") is not None:
            encoded = data["lengths"]
            if not isinstance(encoded, str) or len(encoded) != 4 * (-(-4 * rows // 3)):
                raise ManifestError(f"shard {name}: lengths are not base64 of {rows} little-endian uint32")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ManifestError(f"shard {name}: lengths are not valid base64") from None
            if len(raw) != 4 * rows:
                raise ManifestError(f"shard {name}: {len(raw) // 4} lengths recorded for {rows} rows")
            lengths = np.frombuffer(raw, "<u4").astype(np.uint32)
        return cls(name, rows, size, sha256, lengths)


def _check_shard_name(name: str) -> None:
    # A manifest from elsewhere must not point a reader outside the dataset's own directory or prefix.
    why = unsafe_name(name)
    if why is not None:
        raise ManifestError(f"shard name {name[:80]!r} is not a plain file name inside the dataset directory ({why})")


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

    @property
    def rules(self) -> Rules:
        """What every shard must hold to be served (see `stoker.formats.conform`)."""
        return Rules(self.schema, len(self.classes), self.vocab_size)

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
        except ValueError as exc:  # not JSON, not UTF-8, or an integer literal of thousands of digits
            raise ManifestError(f"{source}: not valid JSON ({str(exc)[:200]})") from None
        except RecursionError:
            raise ManifestError(f"{source}: JSON nested too deeply to be a manifest") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(f"{source}: format version {str(version)[:40]!r} is not supported (this stoker reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
        expected = data.pop("checksum", None)
        try:
            actual = _checksum(data)
        except (TypeError, ValueError, RecursionError):
            raise ManifestError(f"{source}: malformed manifest (values JSON cannot hold)") from None
        if expected != actual:
            raise ManifestError(f"{source}: checksum mismatch; the manifest was edited or damaged")
        try:
            return _from_dict(data, version)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None, *, max_bytes: int | None = None,
             read: Callable[[str, int], bytes | None] | None = None) -> Manifest:
        """Read the manifest of the dataset at `url` (a directory or the manifest file itself); one larger than
        `max_bytes` (default 64 MB, or the environment's STOKER_MAX_MANIFEST_BYTES) is refused unread. `read(path,
        limit)`, if given, reads it instead of fsspec (its bytes, None when over `limit`, FileNotFoundError)."""
        from stoker import storage

        path = url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)
        limit = manifest_limit() if max_bytes is None else int(max_bytes)
        try:
            if read is not None:
                text = read(path, limit)
            else:
                fs, inner = storage.filesystem(path, storage_options)
                try:
                    text = _read_capped(fs, inner, limit)
                except FileNotFoundError:
                    # Object stores' listing caches can predate a file another process wrote since; look again.
                    fs.invalidate_cache(inner.rsplit("/", 1)[0])
                    text = _read_capped(fs, inner, limit)
        except FileNotFoundError:
            raise ManifestError(
                f"{storage.redact(path)}: no manifest; is this a packed dataset, and did `pack-dataset` finish?"
            ) from None
        if text is None:
            raise ManifestError(f"{storage.redact(path)}: larger than the {limit:,}-byte limit on manifests; if it "
                                "is yours, raise STOKER_MAX_MANIFEST_BYTES (or pass max_bytes)")
        return cls.loads(text, storage.redact(path))

    def save(self, url: str, storage_options: dict[str, Any] | None = None, *, name: str = MANIFEST_NAME) -> None:
        """Write the manifest (`manifest.json` unless named) into the dataset directory `url`, atomically."""
        from stoker import storage

        storage.write_bytes_atomic(storage.join(url, name), self.dumps().encode(), storage_options)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _read_capped(fs: Any, path: str, limit: int) -> bytes | None:
    # The file, or None when it is larger than `limit`: nothing is read when its stated size is over the limit,
    # never more than limit + 1 bytes, and no cap-sized buffer is allocated up front for a small file.
    try:
        size = fs.size(path)
    except FileNotFoundError:
        # Some clients (fsspec's http) report any failure as missing: one byte's read raises the real cause.
        fs.cat_file(path, start=0, end=1)
        raise
    if size is not None and size > limit:
        return None
    with fs.open(path, "rb") as f:
        text = f.read(min(size if size is not None else limit, limit) + 1)
    return None if len(text) > limit else text


def manifest_limit() -> int:
    """The manifest size cap in bytes: STOKER_MAX_MANIFEST_BYTES, or 64 MB."""
    text = os.environ.get("STOKER_MAX_MANIFEST_BYTES", "")
    if not text:
        return MAX_MANIFEST_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"STOKER_MAX_MANIFEST_BYTES={text!r} is not a positive number of bytes")
    return int(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_dict(data: dict[str, Any], version: int) -> Manifest:
    """A Manifest from parsed JSON, every field typed and range-checked (see `stoker.formats.conform`)."""
    kind, fmt, schema, classes, vocab, dtype, tokenizer, skipped, options, shards = check_manifest_fields(data)
    infos = tuple(ShardInfo.from_json(s) for s in shards)
    if sum(info.rows for info in infos) >= _MAX_COUNT:
        raise ManifestError("the shards' rows add up to more than 2**62")
    seen: set[str] = set()
    for info in infos:
        if info.name in seen:
            raise ManifestError(f"shard {info.name} is listed more than once")
        seen.add(info.name)
    return Manifest(kind=kind, format=fmt, schema=schema, shards=infos, classes=classes, vocab_size=vocab,
                    token_dtype=dtype, tokenizer=tokenizer, skipped=skipped, options=options, format_version=version)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
