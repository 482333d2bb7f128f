"""Benchmark inputs, generated once and cached under the system temp folder (no downloads)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stoker.synthetic import make_image_tree, make_text_corpus

CACHE = Path(tempfile.gettempdir()) / "stoker-bench-data"


def image_tree(per_class: int = 200, num_classes: int = 10, side: tuple[int, int] = (350, 550)) -> Path:
    """~450x450 natural-looking JPEGs in an ImageNet-style tree (cached)."""
    root = CACHE / f"images-{num_classes}x{per_class}-{side[0]}-{side[1]}"
    marker = root / ".complete"
    if not marker.exists():
        make_image_tree(root, num_classes=num_classes, per_class=per_class, min_side=side[0], max_side=side[1], seed=0)
        marker.touch()
    return root


def packed(tree: Path, shard_mb: int, name: str) -> Path:
    """`tree` packed into shards of `shard_mb` MB (cached; a pack by an older format version is not reused, so the
    benchmark measures what this stoker writes, checksums included)."""
    from stoker.formats.pack import pack_dataset
    from stoker.formats.schema import FORMAT_VERSION

    dst = CACHE / f"packed-{name}-{tree.name}-{shard_mb}mb-v{FORMAT_VERSION}"
    if not (dst / "manifest.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        pack_dataset(str(tree), str(dst), shard_size=shard_mb << 20, workers=2, progress=False)
    return dst


def text_corpus(num_docs: int = 20000) -> Path:
    """A .jsonl corpus with long-tailed document lengths (cached)."""
    path = CACHE / f"text-{num_docs}" / "corpus.jsonl"
    if not path.exists():
        tmp = make_text_corpus(path.with_suffix(".tmp"), num_docs=num_docs, seed=0)
        os.replace(tmp, path)
    return path


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """The shortest wall time of `repeats` calls of `run`, in seconds (the least disturbed by other jobs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
