"""`stoker verify`: recheck every shard of a dataset against its manifest.

A shard is damaged when it is missing, has another size or checksum, does not open, or holds anything a reader
would refuse (its schema differs from the manifest's, a null, a label outside the classes, a token id outside
the vocabulary; see `stoker.formats.conform`). Storage that cannot be read is not damage: it raises StorageError
("could not check"), so the command can tell the two apart.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from stoker import storage
from stoker.errors import StokerError, StorageError
from stoker.formats.conform import check_batch, check_schema
from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.shard import ShardReader, batch_to_samples, open_shard

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shard (the row, when it is one sample), and why."""

    shard: str
    reason: str
    row: int | None = None

    def __str__(self) -> str:
        if self.reason.startswith(self.shard):  # a stoker error that names the shard (and row) itself
            return self.reason
        if self.row is None:
            return f"{self.shard}: {self.reason}"
        return f"{self.shard}: row {self.row}{'' if self.reason.startswith('(') else ':'} {self.reason}"


def _unreachable(url: str, exc: BaseException) -> StorageError:
    return StorageError(f"could not read {storage.redact(url)}: {type(exc).__name__}: "
                        f"{storage.redact_text(str(exc))[:300]}")


def check_shard(url: str, info: ShardInfo, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why the shard `info` of the dataset at `url` is bad (missing, wrong size or checksum), or None; a
    StorageError if it cannot be read at all."""
    shard_url = storage.join(url, info.name)
    return _read_checked(shard_url, *storage.filesystem(shard_url, storage_options), info, keep=False)[0]


def _read_checked(shard_url: str, fs: Any, path: str, info: ShardInfo, *,
                  keep: bool) -> tuple[str | None, memoryview]:
    """Why the shard is bad (see `check_shard`) or None, and with `keep` its bytes as read for the checksum, so
    that a remote shard is downloaded once to be both hashed and opened."""
    kept = bytearray()
    try:
        size = fs.size(path)
        if size != info.bytes:
            return f"size {size} bytes, manifest says {info.bytes} (truncated or replaced)", memoryview(kept)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if keep:
                    kept += chunk
    except FileNotFoundError:
        return "missing", memoryview(kept)
    except OSError as exc:
        raise _unreachable(shard_url, exc) from None
    if digest.hexdigest() != info.sha256:
        return (f"sha256 {digest.hexdigest()[:16]}... differs from the manifest's {info.sha256[:16]}... (corrupt)",
                memoryview(kept))
    return None, memoryview(kept)


def _check_contents(reader: ShardReader, manifest: Manifest, info: ShardInfo, deep: bool) -> list[Problem]:
    """Everything a reader would refuse in one opened shard, row by row; with `deep`, also undecodable images and
    unsafe keys."""
    name, rules = info.name, manifest.rules
    if reader.num_rows != info.rows:
        return [Problem(name, f"{reader.num_rows} rows, manifest says {info.rows}")]
    try:
        check_schema(name, reader.schema, rules)
    except StokerError as exc:
        return [Problem(name, str(exc))]
    problems: list[Problem] = []
    for b in range(reader.num_batches):
        first = int(reader.batch_offsets[b])
        try:
            batch = reader.read_batch(b)
        except StokerError as exc:
            problems.append(Problem(name, str(exc), first))
            continue
        lengths = None if info.lengths is None else info.lengths[first:first + batch.num_rows]
        try:
            check_batch(name, batch, first, rules, lengths)
        except StokerError:
            for r in range(batch.num_rows):  # list every bad row of the batch, not only the first
                try:
                    row_lengths = None if lengths is None else lengths[r:r + 1]
                    check_batch(name, batch.slice(r, 1), first + r, rules, row_lengths)
                except StokerError as exc:
                    problems.append(Problem(name, str(exc), first + r))
            continue
        if deep:
            problems += _deep_rows(name, batch, first, manifest)
    return problems


def _deep_rows(name: str, batch: pa.RecordBatch, first: int, manifest: Manifest) -> list[Problem]:
    from PIL import Image

    from stoker.formats.sources.files import check_key

    problems = []
    for row, sample in enumerate(batch_to_samples(batch), first):
        where = f"({sample.get('key')!r})"
        try:
            check_key(str(sample["key"]))
        except StokerError as exc:
            problems.append(Problem(name, f"{where}: {str(exc).removeprefix(repr(sample['key']) + ': ')}", row))
        if manifest.kind == "image":
            try:
                with Image.open(io.BytesIO(sample["image"])) as image:
                    image.load()  # Pillow refuses decompression bombs (> 2 x MAX_IMAGE_PIXELS) here
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                problems.append(Problem(name, f"{where}: image does not decode ({type(exc).__name__}: {exc})", row))
    return problems


def verify(url: str, storage_options: dict[str, Any] | None = None, *, deep: bool = False,
           manifest: Manifest | None = None) -> list[Problem]:
    """Recompute every shard's checksum, open it and check every value a reader would refuse (with `deep`, also
    decode every image); return every problem of every shard. A StorageError if the storage cannot be read."""
    manifest = manifest or Manifest.load(url, storage_options)
    local = storage.is_local(url)
    problems = []
    for info in manifest.shards:
        shard_url = storage.join(url, info.name)
        fs, path = storage.filesystem(shard_url, storage_options)
        # A local shard is mapped from its file; a remote one is opened from the bytes already read for its hash.
        reason, data = _read_checked(shard_url, fs, path, info, keep=not local)
        if reason:
            problems.append(Problem(info.name, reason))
            continue
        try:
            reader = open_shard(storage.local_path(shard_url) if local else data, name=info.name)
        except StokerError as exc:
            problems.append(Problem(info.name, f"unreadable ({exc})"))
            continue
        except OSError as exc:
            raise _unreachable(shard_url, exc) from None
        with reader:
            problems += _check_contents(reader, manifest, info, deep)
    return problems
