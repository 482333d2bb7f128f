"""Decoding shared by the CPU and Kornia backends: header probe, reduced-size decode, RGB.

Pillow reads every header and decodes every format. Baseline and progressive JPEGs that need no rotation are
decoded by simplejpeg instead when it is installed (the `jpeg` extra): the same libjpeg-turbo, straight into a
numpy array without Pillow's per-image overhead and RGBX storage, about 1.5x faster for ImageNet-sized photos.

Policy, the same on every backend:
- EXIF orientation is honoured (like `ImageOps.exif_transpose`, and like DALI's default), so crop
  boxes are always in the coordinates of the upright image.
- Grayscale, palette, CMYK and alpha images become RGB; alpha is dropped, not composited.
- Images with more than `max_pixels` pixels are refused from their header, before any decode.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import PIL
from PIL import Image

from stoker.errors import ShardError

# Image.open imports Pillow's format plugins on first use; doing it here, before DataLoader workers fork, saves
# every worker that import (up to a second on a loaded 2-core machine, measured before each worker's first batch).
Image.preinit()

try:
    import simplejpeg
except ImportError:  # optional: the `jpeg` extra
    simplejpeg = None

Pixels = Image.Image | np.ndarray  # an upright RGB image: Pillow's, or HWC uint8 from simplejpeg

# EXIF orientation tag value -> the transpose that makes the image upright (as in ImageOps.exif_transpose).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


class DecodeError(ShardError):
    """One sample's image bytes could not be decoded (or were refused); names the key and shard."""

    def __init__(self, message: str, *, key: str | None = None, shard: str | None = None) -> None:
        # Not ShardError.__init__: a DataLoader worker re-raises errors as `type(err)(text)`, so a lone
        # message must be a valid constructor call, or the main process would see a RuntimeError.
        if key is not None or shard is not None:
            message = f"{shard or '<no shard>'}: sample {key or '<no key>'}: {message}"
        Exception.__init__(self, message)
        self.shard, self.offset, self.key = shard or "", None, key

    def __reduce__(self):
        return (_rebuild_decode_error, (self.args[0], self.key, self.shard))


def _rebuild_decode_error(text: str, key: str | None, shard: str) -> DecodeError:
    error = DecodeError(text)
    error.key, error.shard = key, shard
    return error


@dataclass(frozen=True)
class Header:
    """What the file header says: upright size, EXIF orientation and container format."""

    width: int
    height: int
    orientation: int
    format: str


def pil_backend_info() -> dict:
    """Which Pillow is installed: version, whether it is Pillow-SIMD, and whether JPEG uses libjpeg-turbo.

    Pillow-SIMD identifies itself only by a ".postN" suffix on its version (e.g. "9.0.0.post1");
    upstream Pillow does not publish post releases.
    """
    from PIL import features

    return {
        "version": PIL.__version__,
        "simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "jpeg_version": features.version("jpg"),
        "simplejpeg": getattr(simplejpeg, "__version__", None),
    }


def probe(data: bytes, max_pixels: int) -> tuple[Image.Image, Header]:
    """Open `data` lazily (header only) and check its size; raises ValueError/OSError on bad input."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} image has more than max_pixels={max_pixels} pixels (decompression-bomb guard)")
    if w <= 0 or h <= 0:
        raise ValueError(f"image header says {w}x{h}")
    orientation = _orientation(image)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return image, Header(width=w, height=h, orientation=orientation, format=image.format or "")


def _orientation(image: Image.Image) -> int:
    # PNG keeps EXIF in a chunk that Pillow only finds after decoding; do not force a decode just to look.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    value = image.getexif().get(_EXIF_ORIENTATION, 1)
    return value if value in _ORIENT else 1


def decode_for_box(
    image: Image.Image,
    header: Header,
    box: tuple[float, float, float, float],
    out_size: tuple[int, int],
) -> tuple[Pixels, tuple[float, float, float, float]]:
    """Decode `image` just large enough that `box` still covers `out_size` (w, h) pixels.

    Returns an upright RGB image and the box in its coordinates. JPEGs are decoded at 1/2, 1/4 or 1/8
    scale by libjpeg (`Image.draft`, or simplejpeg's scaled decode), so decode work shrinks with the output;
    any remaining factor of 2 or more is removed with `Image.reduce` over the box only. The residual resample
    is then under 2x.
    """
    out_w, out_h = out_size
    factor = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    stored_w, stored_h = image.size
    if simplejpeg is not None and header.format == "JPEG" and header.orientation == 1 and image.mode in ("RGB", "L"):
        scale = _dct_scale(stored_w, stored_h, factor)
        pixels = simplejpeg.decode_jpeg(image.fp.getbuffer(), colorspace="RGB", min_width=-(-stored_w // scale),
                                        min_height=-(-stored_h // scale))
        sx, sy = pixels.shape[1] / header.width, pixels.shape[0] / header.height
        scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        if min((scaled[2] - scaled[0]) / out_w, (scaled[3] - scaled[1]) / out_h) < 2:
            return pixels, scaled
        image = Image.fromarray(pixels)  # still 2x or more too large (beyond 1/8 scale): reduce it below
    elif header.format in ("JPEG", "MPO") and factor >= 2:  # MPO: camera JPEGs with extra frames
        # draft() picks the smallest DCT scale whose result is still >= the requested size.
        image.draft("RGB", (math.ceil(stored_w / factor), math.ceil(stored_h / factor)))
    return _reduced(image, header, box, out_size)


def _dct_scale(width: int, height: int, factor: float) -> int:
    """The DCT scale (1, 2, 4 or 8) that `Image.draft` picks for a target of (`width`, `height`) / `factor`;
    libjpeg-turbo's other scales (3/8, 5/8...) have no fast path."""
    fits = min(width // math.ceil(width / factor), height // math.ceil(height / factor))
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _reduced(image: Image.Image, header: Header, box: tuple[float, float, float, float],
             out_size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Pillow's part of `decode_for_box`: load, make upright and RGB, reduce by any remaining factor >= 2."""
    out_w, out_h = out_size
    image.load()
    if header.orientation != 1:
        image = image.transpose(_ORIENT[header.orientation])
    if image.mode != "RGB":
        image = _to_rgb(image)
    sx, sy = image.width / header.width, image.height / header.height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    factor = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    if factor >= 2:
        k = int(factor)
        ibox = _enclosing(box, image.width, image.height)
        image = image.reduce(k, box=ibox)
        box = ((box[0] - ibox[0]) / k, (box[1] - ibox[1]) / k, (box[2] - ibox[0]) / k, (box[3] - ibox[1]) / k)
    return image, box


def decode_full(data: bytes, max_pixels: int) -> Image.Image:
    """The whole image, upright and RGB, at full resolution (reference decode and error triage)."""
    image, header = probe(data, max_pixels)
    full = (0.0, 0.0, float(header.width), float(header.height))
    image, _ = decode_for_box(image, header, full, (header.width, header.height))
    return as_image(image)


def size_of(pixels: Pixels) -> tuple[int, int]:
    """(width, height) of decoded pixels."""
    return pixels.size if isinstance(pixels, Image.Image) else (pixels.shape[1], pixels.shape[0])


def crop(pixels: Pixels, box: tuple[int, int, int, int]) -> np.ndarray:
    """The whole-pixel `box` (x0, y0, x1, y1) of decoded pixels as a C-contiguous HWC uint8 array."""
    if isinstance(pixels, Image.Image):
        return np.array(pixels.crop(box))  # np.array, not asarray: Pillow's export is read-only
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(pixels[y0:y1, x0:x1])


def as_image(pixels: Pixels) -> Image.Image:
    """Decoded pixels as a Pillow image (for Pillow's resampling)."""
    return pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # 16-bit grayscale: keep the top 8 bits; convert() would clip everything above 255 to white.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


def _enclosing(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
