"""`stoker inspect`: a human-readable summary of a packed dataset, with size or token-length histograms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from stoker import storage
from stoker.bucketing.metrics import length_histogram, render_histogram
from stoker.errors import ShardError
from stoker.formats.manifest import Manifest
from stoker.formats.shard import arrow_to_numpy, open_shard


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
        lines += render_histogram(length_histogram(lengths, bins=10), width=30)
        return lines
    lines.append(f"classes  {len(manifest.classes)}: {', '.join(manifest.classes[:5])}{' ...' if len(manifest.classes) > 5 else ''}")
    sides, nbytes = [], []
    for info in manifest.shards:
        if not storage.is_local(url):
            break
        try:
            with open_shard(storage.local_path(storage.join(url, info.name)), name=info.name) as reader:
                for batch in reader.iter_batches(["height", "width", "image"]):
                    sides.append(np.maximum(arrow_to_numpy(batch.column("height")), arrow_to_numpy(batch.column("width"))))
                    nbytes.append(arrow_to_numpy(pc.binary_length(batch.column("image"))))
        except (ShardError, OSError) as exc:
            lines.append(f"warning  {info.name}: {exc}")
    if sides:
        longest, sizes = np.concatenate(sides), np.concatenate(nbytes)
        lines.append(f"image bytes  mean {sizes.mean() / 1e3:.1f} kB, max {sizes.max() / 1e3:.1f} kB")
        lines.append("longest side histogram (pixels):")
        lines += render_histogram(length_histogram(longest, bins=10), width=30)
    return lines
