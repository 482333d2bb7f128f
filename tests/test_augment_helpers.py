"""Image fixtures shared by the test_augment_* files (no tests here): real encoded JPEG/PNG/WebP bytes."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from stoker.synthetic import natural_image


@functools.lru_cache(maxsize=None)
def photo(seed: int, height: int, width: int) -> Image.Image:
    """A photo-like RGB image (smooth colour, shapes, mild texture)."""
    return natural_image(np.random.default_rng(seed), height, width)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    """The image encoded in memory as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int, height: int, width: int, **options) -> bytes:
    """A photo-like JPEG of the given size."""
    return encode(photo(seed, height, width), "JPEG", quality=92, **options)


def exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    """A JPEG whose EXIF orientation tag is `orientation` (pixels stored as given)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def gradient_png(width: int = 256, height: int = 256) -> bytes:
    """Lossless image whose red channel is the x coordinate and green the y coordinate (0..255)."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).round().astype(np.uint8)
    return encode(Image.fromarray(rgb), "PNG")


def as_samples(blobs: list[bytes], shard: str = "shard-000") -> list[dict]:
    """Sample dicts in the collate contract: image bytes, label, key, shard."""
    return [{"image": b, "label": i, "key": f"img-{i:03d}", "shard": shard} for i, b in enumerate(blobs)]


def mixed_batch() -> list[bytes]:
    """One of each kind of input the backends must handle, at varied sizes."""
    base = photo(3, 180, 240)
    return [
        jpeg(1, 300, 400),
        jpeg(2, 333, 250, progressive=True),
        encode(base.convert("L"), "JPEG", quality=92),
        encode(base.convert("CMYK"), "JPEG", quality=92),
        encode(base, "PNG"),
        encode(base.convert("RGBA"), "PNG"),
        encode(base.convert("P"), "PNG"),
        encode(base, "WEBP", quality=90),
        encode(base.convert("RGBA"), "WEBP", lossless=True),
        exif_jpeg(photo(4, 200, 300), 6),
        encode(Image.new("RGB", (1, 1), (200, 30, 90)), "JPEG", quality=95),
    ]
