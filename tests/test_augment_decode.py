"""Pillow decoding shared by the CPU and Kornia backends: formats, orientation, reduced size, bombs."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import PIL
import pytest
from PIL import Image, ImageOps

from stoker.augment import decode
from stoker.augment.decode import DecodeError, decode_for_box, decode_full, pil_backend_info, probe, size_of
from stoker.errors import ShardError, StokerError
from test_augment_helpers import encode, exif_jpeg, jpeg, photo

BASE = photo(7, 90, 120)

FORMATS = {
    "jpeg": lambda: encode(BASE, "JPEG", quality=90),
    "jpeg-progressive": lambda: encode(BASE, "JPEG", quality=90, progressive=True),
    "jpeg-grayscale": lambda: encode(BASE.convert("L"), "JPEG"),
    "jpeg-cmyk": lambda: encode(BASE.convert("CMYK"), "JPEG"),
    "png": lambda: encode(BASE, "PNG"),
    "png-rgba": lambda: encode(BASE.convert("RGBA"), "PNG"),
    "png-la": lambda: encode(BASE.convert("LA"), "PNG"),
    "png-palette-transparent": lambda: encode(BASE.convert("P"), "PNG", transparency=0),
    "webp": lambda: encode(BASE, "WEBP", quality=80),
    "webp-rgba": lambda: encode(BASE.convert("RGBA"), "WEBP", lossless=True),
    "jpeg-1x1": lambda: encode(Image.new("RGB", (1, 1), (9, 99, 199)), "JPEG"),
    "png-1x1-gray": lambda: encode(Image.new("L", (1, 1), 77), "PNG"),
}


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request, monkeypatch):
    """Run a test with each JPEG decoder: simplejpeg (the `jpeg` extra) and Pillow alone."""
    if request.param == "pillow":
        monkeypatch.setattr(decode, "simplejpeg", None)
    elif decode.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (pip install 'stoker[jpeg]')")
    return request.param


def _reference(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_full_decode_equals_pillow(name, decoder):
    data = FORMATS[name]()
    decoded = decode_full(data, max_pixels=10**8)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), _reference(data))


def test_sixteen_bit_grayscale_keeps_its_top_byte():
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    decoded = np.asarray(decode_full(encode(Image.fromarray(values), "PNG"), 10**8))
    np.testing.assert_array_equal(decoded[..., 0], (values >> 8).astype(np.uint8))
    assert decoded[10, 0, 0] == 40  # 10240 >> 8; convert("RGB") alone would clip it to 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured(orientation):
    data = exif_jpeg(photo(8, 60, 100), orientation)
    _, header = probe(data, 10**8)
    assert header.orientation == orientation
    assert (header.width, header.height) == ((60, 100) if orientation >= 5 else (100, 60))
    np.testing.assert_array_equal(np.asarray(decode_full(data, 10**8)), _reference(data))


def test_jpeg_draft_decodes_at_reduced_size_but_keeps_enough_pixels(decoder):
    data = jpeg(9, 900, 1200)
    image, header = probe(data, 10**8)
    box = (100.0, 50.0, 1150.0, 850.0)  # 1050x800 source pixels onto 224x224: factor 3.6
    decoded, scaled = decode_for_box(image, header, box, (224, 224))
    assert size_of(decoded) == (600, 450)  # libjpeg's DCT scaling decoded at 1/2
    decoded = decode.as_image(decoded)
    assert scaled[2] - scaled[0] >= 224 and scaled[3] - scaled[1] >= 224
    assert min(scaled[2] - scaled[0], scaled[3] - scaled[1]) < 2 * 224  # and no more than needed
    # The reduced decode still shows the same picture as a full decode resized the same way.
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR, box=box)
    reduced = decoded.resize((224, 224), Image.Resampling.BILINEAR, box=scaled)
    assert np.abs(np.asarray(full, np.int16) - np.asarray(reduced, np.int16)).mean() < 2.0


def test_small_outputs_of_non_jpeg_inputs_are_reduced_over_the_box_only():
    data = encode(photo(10, 800, 800), "PNG")
    image, header = probe(data, 10**8)
    decoded, scaled = decode_for_box(image, header, (0.0, 0.0, 400.0, 400.0), (64, 64))
    assert decoded.size == (67, 67)  # 400 px box reduced 6x (ceil); the rest of the image dropped
    assert 64 <= scaled[2] - scaled[0] < 128


def test_no_reduction_when_the_output_needs_full_resolution(decoder):
    data = jpeg(11, 300, 400)
    image, header = probe(data, 10**8)
    decoded, scaled = decode_for_box(image, header, (0.0, 0.0, 400.0, 300.0), (224, 224))
    assert size_of(decoded) == (400, 300) and scaled == (0.0, 0.0, 400.0, 300.0)
    assert isinstance(decoded, np.ndarray) == (decoder == "simplejpeg")


@pytest.mark.parametrize("width, height, factor, scale", [
    (1200, 900, 3.6, 2), (1200, 900, 1.9, 1), (1200, 900, 4.0, 4), (1200, 900, 40.0, 8), (601, 451, 2.0, 1),
    (602, 452, 2.0, 2), (602, 452, 0.5, 1),
])
def test_dct_scale_is_the_one_pillow_draft_picks(width, height, factor, scale):
    assert decode._dct_scale(width, height, factor) == scale
    image = Image.open(io.BytesIO(jpeg(1, height, width)))
    image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    assert image.size == (-(-width // scale), -(-height // scale))  # what draft() chose, for the same request


def test_reduced_beyond_an_eighth_by_simplejpeg_then_pillow(decoder):
    data = jpeg(13, 1800, 2400)
    image, header = probe(data, 10**8)
    decoded, scaled = decode_for_box(image, header, (0.0, 0.0, 2400.0, 1800.0), (32, 24))  # factor 75
    assert isinstance(decoded, Image.Image) and size_of(decoded) == (34, 25)  # 1/8 decode, then reduce(9)
    assert 32 <= scaled[2] - scaled[0] < 64


def test_images_over_max_pixels_are_refused_from_the_header():
    with pytest.raises(ValueError, match="max_pixels=10000"):
        probe(jpeg(12, 200, 200), max_pixels=10_000)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: only a header check can refuse it cheaply."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_header_fails_before_decoding():
    with pytest.raises((ValueError, Image.DecompressionBombError)):
        probe(_png_claiming(100_000, 100_000), max_pixels=64_000_000)
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        probe(_png_claiming(9_000, 9_000), max_pixels=64_000_000)


def test_garbage_bytes_fail_in_probe():
    with pytest.raises(Exception):
        probe(b"definitely not an image", 10**8)


def test_decode_error_names_key_and_shard_and_survives_pickling():
    import pickle

    error = DecodeError("cannot decode image", key="img-7", shard="train-00003.shard")
    assert isinstance(error, ShardError) and isinstance(error, StokerError)
    assert "img-7" in str(error) and "train-00003.shard" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.key, clone.shard, str(clone)) == (error.key, error.shard, str(error))
    # DataLoader workers re-raise as type(error)(message): that must construct, not become a RuntimeError.
    assert str(DecodeError(str(error))) == str(error)


def test_pil_backend_info_detects_pillow_simd_by_its_post_version(monkeypatch):
    info = pil_backend_info()
    assert info["version"] == PIL.__version__ and isinstance(info["libjpeg_turbo"], bool)
    assert info["simd"] is (".post" in PIL.__version__)
    monkeypatch.setattr(PIL, "__version__", "9.0.0.post1")
    assert pil_backend_info()["simd"] is True
