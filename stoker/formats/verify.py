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


def _deep_check(url: str, manifest: Manifest, info: ShardInfo, storage_options: dict[str, Any] | None) -> list[str]:
    """Decode every image / check every token array of one shard; return what is wrong, row by row."""
    import io

    import numpy as np
    from PIL import Image

    from stoker.formats.shard import batch_to_samples
    from stoker.formats.sources import check_key

    reasons: list[str] = []
    vocab = manifest.vocab_size
    expected = info.lengths
    fs, path = storage.filesystem(storage.join(url, info.name), storage_options)
    with fs.open(path, "rb") as f, open_shard(f, name=info.name) as reader:
        row = 0
        for batch in reader.iter_batches():
            for sample in batch_to_samples(batch):
                where = f"row {row} ({sample.get('key')!r})"
                try:
                    check_key(str(sample["key"]))
                except StokerError as exc:
                    reasons.append(f"{where}: {exc}")
                if manifest.kind == "image":
                    try:
                        with Image.open(io.BytesIO(sample["image"])) as image:
                            image.load()  # Pillow refuses decompression bombs (> 2 x MAX_IMAGE_PIXELS) here
                    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                        reasons.append(f"{where}: image does not decode ({type(exc).__name__}: {exc})")
                else:
                    tokens = sample["tokens"]
                    if len(tokens) != sample["length"]:
                        reasons.append(f"{where}: {len(tokens)} tokens stored but length says {sample['length']}")
                    elif expected is not None and int(expected[row]) != len(tokens):
                        reasons.append(f"{where}: manifest records length {int(expected[row])}, shard has {len(tokens)}")
                    if vocab is not None and len(tokens) and int(np.max(tokens)) >= vocab:
                        reasons.append(f"{where}: token id {int(np.max(tokens))} outside the vocabulary of {vocab}")
                row += 1
    return reasons


def verify(url: str, storage_options: dict[str, Any] | None = None, *, deep: bool = False) -> list[Problem]:
    """Recompute every shard's checksum and row count (and with `deep`, decode every sample); return the problems."""
    manifest = Manifest.load(url, storage_options)
    problems = []
    for info in manifest.shards:
        reason = check_shard(url, info, storage_options)
        if reason:
            problems.append(Problem(info.name, reason))
        elif deep:
            problems += [Problem(info.name, r) for r in _deep_check(url, manifest, info, storage_options)]
    return problems
