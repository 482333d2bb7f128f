"""`stoker verify` and `stoker inspect`: recheck every shard against the manifest, and summarise a dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from stoker import storage
from stoker.errors import ShardError, StokerError
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


def _histogram(values: np.ndarray, bins: int = 10) -> list[str]:
    if values.size == 0:
        return ["  (no samples)"]
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(np.unique(values)))))
    top = max(int(counts.max()), 1)
    return [
        f"  {edges[i]:>9.0f} - {edges[i + 1]:<9.0f} {'#' * max(1 if c else 0, round(30 * c / top)):<30} {c}"
        for i, c in enumerate(counts)
    ]


def inspect(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Human-readable summary lines: samples, classes, shards, bytes, and size or length histograms."""
    manifest = Manifest.load(url, storage_options)
    lines = [
        f"dataset  {storage.redact(url)}",
        f"kind     {manifest.kind} ({manifest.format} shards, format version {manifest.format_version})",
        f"samples  {manifest.num_samples:,} in {len(manifest.shards)} shards, {manifest.num_bytes / 1e6:,.1f} MB",
    ]
    if manifest.skipped:
        lines.append(f"skipped  {len(manifest.skipped)} input files at pack time (see manifest 'skipped')")
    if manifest.kind == "text":
        lengths = manifest.lengths
        lines.append(f"tokens   {int(lengths.sum()):,} ({manifest.token_dtype}, vocabulary {manifest.vocab_size}, tokenizer {manifest.tokenizer})")
        if lengths.size:
            lines.append(f"length   min {lengths.min()}, median {int(np.median(lengths))}, mean {lengths.mean():.1f}, max {lengths.max()}")
        lines.append("length histogram (tokens per sample):")
        lines += _histogram(lengths)
        return lines
    lines.append(f"classes  {len(manifest.classes)}: {', '.join(manifest.classes[:5])}{' ...' if len(manifest.classes) > 5 else ''}")
    sides, nbytes = [], []
    for info in manifest.shards:
        if not storage.is_local(url):
            break
        try:
            with open_shard(storage.local_path(storage.join(url, info.name)), name=info.name) as reader:
                for batch in reader.iter_batches(["height", "width", "image"]):
                    sides.append(np.maximum(batch.column("height").to_numpy(), batch.column("width").to_numpy()))
                    nbytes.append(pc.binary_length(batch.column("image")).to_numpy())
        except (ShardError, OSError) as exc:
            lines.append(f"warning  {info.name}: {exc}")
    if sides:
        longest, sizes = np.concatenate(sides), np.concatenate(nbytes)
        lines.append(f"image bytes  mean {sizes.mean() / 1e3:.1f} kB, max {sizes.max() / 1e3:.1f} kB")
        lines.append("longest side histogram (pixels):")
        lines += _histogram(longest)
    return lines
