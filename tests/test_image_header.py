"""The header walk that gives packing its image sizes agrees with Pillow, and defers to it on anything odd."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stoker.formats.image_header import image_size
from stoker.formats.sources.images import ImageItem, load_image
from stoker.synthetic import natural_image


def _encode(mode: str, fmt: str, size: tuple[int, int] = (37, 23), **options: object) -> bytes:
    image = natural_image(np.random.default_rng(0), size[1], size[0]).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _pillow(data: bytes) -> tuple[str, int, int] | str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format, *image.size)
    except Exception as exc:  # noqa: BLE001 - any refusal counts as "Pillow would not open it"
        return type(exc).__name__


ENCODINGS = {
    "baseline": _encode("RGB", "JPEG"),
    "progressive": _encode("RGB", "JPEG", progressive=True),
    "grayscale": _encode("L", "JPEG"),
    "cmyk": _encode("CMYK", "JPEG"),
    "1x1": _encode("RGB", "JPEG", size=(1, 1)),
    "wide-optimized": _encode("RGB", "JPEG", size=(3000, 17), optimize=True),
    "exif+icc": _encode("RGB", "JPEG", exif=Image.Exif().tobytes(), icc_profile=b"\0" * 300),
    "444": _encode("RGB", "JPEG", subsampling=0, quality=95),
    "png-rgb": _encode("RGB", "PNG"),
    "png-rgba": _encode("RGBA", "PNG"),
    "png-palette": _encode("P", "PNG"),
    "png-gray": _encode("L", "PNG"),
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_size_matches_pillow(name: str) -> None:
    data = ENCODINGS[name]
    assert image_size(data) == _pillow(data)


def test_incomplete_or_foreign_files_are_left_to_pillow() -> None:
    jpeg, png = ENCODINGS["baseline"], ENCODINGS["png-rgb"]
    assert image_size(jpeg[:-2]) is None  # no end-of-image marker
    assert image_size(jpeg[: len(jpeg) // 2]) is None
    assert image_size(png[:-12]) is None  # no IEND chunk
    assert image_size(_encode("RGB", "GIF")) is None
    assert image_size(b"not an image at all") is None
    assert image_size(jpeg + b"\0\0\0") == _pillow(jpeg)  # zero padding after EOI is common and harmless


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:  # flip bytes in the header region
        for pos in rng.integers(0, min(len(out), 700), int(rng.integers(1, 4))):
            out[pos] = int(rng.integers(256))
    elif kind == 1:  # cut a piece out of the header region
        a = int(rng.integers(0, min(len(out), 700)))
        del out[a : a + int(rng.integers(1, 16))]
    else:  # repeat a piece of it
        a = int(rng.integers(0, min(len(out), 700)))
        out[a:a] = out[a : a + int(rng.integers(1, 16))]
    return bytes(out)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow reading mutated EXIF says so
def test_mutated_headers_never_get_a_size_pillow_would_not_give() -> None:
    rng = np.random.default_rng(7)
    samples = list(ENCODINGS.values())
    accepted = 0
    for _ in range(3000):
        data = _mutate(samples[int(rng.integers(len(samples)))], rng)
        fast = image_size(data)
        if fast is not None:
            accepted += 1
            assert fast == _pillow(data), data[:64]
    # Most single mutations hit pixel data or harmless bytes; the walk must still answer for those itself.
    assert accepted > 1000


def test_pack_sample_is_the_same_with_or_without_pillow(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("baseline", "cmyk", "png-rgba"):
        (tmp_path / "a" / f"{name}.img").write_bytes(ENCODINGS[name])
    for name in ("baseline", "cmyk", "png-rgba"):
        item = ImageItem(f"a/{name}.img", 0, len(ENCODINGS[name]))
        fast = load_image(str(tmp_path), item, max_side=None, quality=90, validate="header")
        decoded = load_image(str(tmp_path), item, max_side=None, quality=90, validate="decode")  # always Pillow
        assert fast == decoded
        assert (fast["width"], fast["height"]) == _pillow(ENCODINGS[name])[1:]


def test_decompression_bombs_are_left_to_pillow() -> None:
    data = bytearray(ENCODINGS["baseline"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2  # 30000 x 30000: past Image.MAX_IMAGE_PIXELS
    assert image_size(bytes(data)) is None  # Pillow warns about it, or refuses it, as it always did
