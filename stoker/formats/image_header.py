"""Width and height of a JPEG or PNG from its header bytes, without Pillow.

Packing stores the size of every image. `PIL.Image.open` (plugin dispatch, a parser object, every segment decoded
into info dicts) took 70-200 us per JPEG here, the largest part of packing's CPU time; walking the segment
headers takes a tenth of that. The walk accepts only what Pillow would open with the same size (the common
segments, well formed); anything else returns None and the caller asks Pillow, whose answers and errors stay
the reference.
"""

from __future__ import annotations

import zlib

from PIL import Image

# Start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SKIPPED = frozenset([0xC4, 0xDD, 0xFE, *range(0xE0, 0xF0)])  # DHT, DRI, COM, APP0-15: read past them
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) of a complete JPEG or PNG, or None when the bytes need Pillow to judge them.

    "Complete" is the check `--validate header` promises: a JPEG ends with its end-of-image marker (trailing
    zero padding allowed), a PNG with its IEND chunk.
    """
    if data[:2] == b"\xff\xd8":
        fmt, size = "JPEG", _jpeg_size(data)
    elif data[:8] == _PNG_SIGNATURE:
        fmt, size = "PNG", _png_size(data)
    else:
        return None
    return (fmt, *size) if size is not None and ends_whole(fmt, data) else None


def ends_whole(fmt: str, data: bytes) -> bool:
    """False for a JPEG without its end-of-image marker (trailing zeros allowed) or a PNG without its IEND chunk."""
    if fmt == "JPEG":
        return data.rstrip(b"\0").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data.endswith(_PNG_END)
    return True


def _plausible(width: int, height: int) -> tuple[int, int] | None:
    # Pillow warns about (and past twice the limit refuses) decompression bombs: leave those to it.
    return (width, height) if width and height and width * height <= Image.MAX_IMAGE_PIXELS else None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """IHDR's size, if every chunk up to the first IDAT is whole and its CRC matches (as Pillow checks)."""
    i, end, size = 8, len(data), None
    while i + 12 <= end:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if i + 12 + length > end or zlib.crc32(data[i + 4 : i + 8 + length]) != int.from_bytes(data[i + 8 + length : i + 12 + length], "big"):
            return None
        if kind == b"IHDR":
            if size is not None or length != 13:
                return None
            size = _plausible(int.from_bytes(data[i + 8 : i + 12], "big"), int.from_bytes(data[i + 12 : i + 16], "big"))
            if size is None:
                return None
        elif size is None:  # IHDR must come first
            return None
        elif kind == b"IDAT":
            return size
        i += 12 + length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size, if the segments up to the first scan are common and well formed (Pillow reads as far)."""
    i, end, size = 2, len(data), None
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None  # junk between segments: Pillow's call
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > end:
            return None
        body = data[i + 4 : i + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            return size
        if marker in _SOF:
            # 8-bit samples with 1, 3 or 4 components is what Pillow opens; the rest is its call.
            if size is not None or len(body) < 6 or body[0] != 8 or body[5] not in (1, 3, 4) or len(body) != 6 + 3 * body[5]:
                return None
            size = _plausible(int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
            if size is None:
                return None
        elif marker == 0xDB:  # quantization tables: whole tables only
            j = 0
            while j < len(body):
                j += 65 if body[j] < 16 else 129
            if j != len(body):
                return None
        elif marker not in _SKIPPED:
            return None
        i += 2 + length
    return None
