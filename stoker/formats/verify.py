"""`stoker verify`: recheck every shard of a dataset against its manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from stoker import storage
from stoker.errors import StokerError
from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.shard import open_shard

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Problem:
    """One shard that failed verification, and why."""

    shard: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.reason}"


def check_shard(url: str, info: ShardInfo, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why the shard `info` of the dataset at `url` is bad (missing, wrong size or checksum, unreadable), or None."""
    fs, path = storage.filesystem(storage.join(url, info.name), storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return "missing"
    if size != info.bytes:
        return f"size {size} bytes, manifest says {info.bytes} (truncated or replaced)"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != info.sha256:
        return f"sha256 {digest.hexdigest()[:16]}... differs from the manifest's {info.sha256[:16]}... (corrupt)"
    local = storage.is_local(url)
    try:
        with (open(storage.local_path(storage.join(url, info.name)), "rb") if local else fs.open(path, "rb")) as f:
            with open_shard(f, name=info.name) as reader:
                if reader.num_rows != info.rows:
                    return f"{reader.num_rows} rows, manifest says {info.rows}"
    except (StokerError, OSError) as exc:
        return f"unreadable ({exc})"
    return None


def verify(url: str, storage_options: dict[str, Any] | None = None) -> list[Problem]:
    """Recompute every shard's checksum and row count; return the problems (empty when all is well)."""
    manifest = Manifest.load(url, storage_options)
    problems = []
    for info in manifest.shards:
        reason = check_shard(url, info, storage_options)
        if reason:
            problems.append(Problem(info.name, reason))
    return problems
