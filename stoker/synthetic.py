"""Generate data for the demo, tests and benchmarks: an ImageNet-style JPEG tree, a small text corpus, and small
packed datasets written with the format layer directly (`make_dataset`).

The images are smooth gradients with shapes and soft texture, so that JPEG sizes and decode costs resemble
photographs rather than flat colour or white noise (both of which make benchmarks lie).

In a `make_dataset` dataset sample i (global index, manifest order) has key f"{i:06d}" and label i % 10, so tests can
check exactly-once delivery and order from the keys alone. Image payloads are random bytes whose first 6 bytes repeat
the key.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.schema import describe, image_schema, text_schema
from stoker.formats.shard import SUFFIX, create_writer

CLASS_NAMES = [
    "n01440764_tench", "n01443537_goldfish", "n01484850_shark", "n01491361_tiger_shark", "n01494475_hammerhead",
    "n01496331_ray", "n01498041_stingray", "n01514668_cock", "n01514859_hen", "n01518878_ostrich",
]


def natural_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Return a photo-like RGB image: low-frequency colour field, a few shapes, mild texture."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    channels = []
    for _ in range(3):
        field = np.zeros((height, width), np.float32)
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (fy * ys + fx * xs) + phase)
        channels.append(field)
    rgb = np.stack(channels, axis=-1)
    rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-6) * 200 + 25
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2 + 11)), y0 + int(rng.integers(10, height // 2 + 11))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.5))))
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    textured = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(textured, "RGB")


def make_image_tree(
    root: str | Path,
    *,
    num_classes: int = 10,
    per_class: int = 150,
    min_side: int = 200,
    max_side: int = 600,
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write `root/<class>/<nnnnn>.jpg` images of varied sizes; return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class_{i:04d}" for i in range(num_classes)]
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            natural_image(rng, h, w).save(folder / f"{name}_{i:05d}.jpg", quality=quality)
    return root


_WORDS = (
    "the a of to and in is it that for on with as was by at be this from or an are not have but which one data "
    "shard loader stream batch token model train epoch sample worker cache disk network gpu cpu decode image "
    "text bucket padding length packing throughput latency memory prefetch shuffle seed rank resume"
).split()


def make_text_corpus(path: str | Path, *, num_docs: int = 2000, seed: int = 0) -> Path:
    """Write a `.jsonl` file of documents with a long-tailed length distribution; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=4.0, sigma=0.9, size=num_docs), 1, 1500).astype(int)
    with open(path, "w", encoding="utf-8") as f:
        for i, n in enumerate(lengths):
            words = rng.choice(_WORDS, size=int(n))
            f.write(json.dumps({"id": i, "text": " ".join(words)}) + "\n")
    return path


def make_dataset(
    root: str | os.PathLike[str],
    rows: Sequence[int] = (40, 40, 40, 40),
    *,
    kind: str = "image",
    fmt: str = "arrow",
    batch_bytes: int = 4096,
    payload: tuple[int, int] = (50, 400),
    seed: int = 0,
) -> str:
    """Write a dataset with len(rows) shards of the given row counts into `root`; return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = image_schema() if kind == "image" else text_schema(np.dtype(np.uint16))
    shards, index = [], 0
    for s, count in enumerate(rows):
        name = f"shard-{s:05d}{SUFFIX[fmt]}"
        writer = create_writer(fmt, str(root / name), schema, batch_bytes=batch_bytes)
        lengths = []
        for _ in range(count):
            key = f"{index:06d}"
            size = int(rng.integers(*payload))
            if kind == "image":
                body = key.encode() + rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                writer.add({"key": key, "label": index % 10, "image": body, "height": size % 97 + 1, "width": 7})
            else:
                tokens = np.full(size % 60 + 1, index % 65536, dtype=np.uint16)
                lengths.append(len(tokens))
                writer.add({"key": key, "tokens": tokens, "length": len(tokens)})
            index += 1
        n, nbytes, sha = writer.close()
        lengths_arr = np.asarray(lengths, np.uint32) if kind == "text" else None
        shards.append(ShardInfo(name, n, nbytes, sha, lengths_arr))
    manifest = Manifest(
        kind=kind,
        format=fmt,
        schema=describe(schema),
        shards=tuple(shards),
        classes=tuple(f"class_{i}" for i in range(10)) if kind == "image" else (),
        token_dtype="uint16" if kind == "text" else None,
    )
    manifest.save(str(root))
    return str(root)


def keys_of(batches: Sequence[dict]) -> list[str]:
    """All keys of a list of collated batches, in order."""
    return [k for b in batches for k in b["key"]]


def to_memory(local: str | os.PathLike[str]) -> str:
    """Copy a dataset's files to a fresh fsspec memory:// prefix (a remote source without a server); return its URL."""
    fs = fsspec.filesystem("memory")
    url = f"memory://stoker-{uuid.uuid4().hex[:8]}/ds"
    for path in Path(local).iterdir():
        fs.pipe(url + "/" + path.name, path.read_bytes())
    return url
