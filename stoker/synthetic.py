"""Generate the embedded default data: an ImageNet-style JPEG tree and a small text corpus.

The images are smooth gradients with shapes and soft texture, so that JPEG sizes and decode costs resemble
photographs rather than flat colour or white noise (both of which make benchmarks lie).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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
