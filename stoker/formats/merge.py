"""`stoker merge DST`: combine the partial manifests of a partitioned pack (`--part I/N`) into one, atomically.

Every part must be present and every shard must verify before `manifest.json` is written; otherwise the error
names each missing or bad part and nothing is written. Merging again gives the same manifest.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from stoker import storage
from stoker.errors import ManifestError
from stoker.formats.manifest import MANIFEST_NAME, Manifest
from stoker.formats.pack import Layout
from stoker.formats.verify import check_shard

_PART = re.compile(r"manifest\.part-(\d{5})-of-(\d{5})\.json$")
_SAME = ("format_version", "kind", "format", "schema", "classes", "vocab_size", "token_dtype", "tokenizer")


def merge(dst: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Check all N parts in `dst`, verify their shards, and write the combined `manifest.json`."""
    fs, path = storage.filesystem(dst, storage_options)
    fs.invalidate_cache(path)  # parts were written by other processes after any listing this one cached
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    found = {(int(m.group(1)), int(m.group(2))) for m in map(_PART.match, names) if m}
    counts = {n for _, n in found}
    if not found:
        raise ManifestError(f"{storage.redact(dst)}: no partial manifests (manifest.part-I-of-N.json); pack each part first (part=(I, N))")
    if len(counts) > 1:
        raise ManifestError(f"{storage.redact(dst)}: parts of different splits {sorted(counts)} side by side; keep one N")
    count = counts.pop()
    problems = []
    for index in range(count):
        if (index, count) not in found:
            running = Layout.of((index, count)).state_dir in names
            problems.append(f"part {index}/{count} is missing" + (" (it is still running, or crashed: rerun it)" if running else ""))
    parts = []
    for index, _ in sorted(found):
        layout = Layout.of((index, count))
        part = Manifest.load(storage.join(dst, layout.manifest), storage_options)
        bad = [f"{s.name}: {why}" for s in part.shards if (why := check_shard(dst, s, storage_options))]
        problems += [f"part {index}/{count}: shard {b}" for b in bad]
        parts.append(part)
    for part in parts[1:]:
        differ = [k for k in _SAME if getattr(part, k) != getattr(parts[0], k)]
        if differ:
            problems.append(f"parts disagree on {', '.join(differ)}: were they packed with the same command?")
            break
    if problems:
        raise ManifestError(f"{storage.redact(dst)}: cannot merge: " + "; ".join(problems))
    fingerprint = hashlib.sha256("".join(p.options.get("fingerprint", "") for p in parts).encode()).hexdigest()
    merged = parts[0].replace(
        shards=tuple(s for p in parts for s in p.shards),
        skipped=tuple(s for p in parts for s in p.skipped),
        options={**parts[0].options, "fingerprint": fingerprint, "part": None, "parts": count},
    )
    merged.save(dst, storage_options, name=MANIFEST_NAME)
    return merged

