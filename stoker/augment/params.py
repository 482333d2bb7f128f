"""Random parameters per sample: where to crop, whether to flip, how much colour jitter.

All backends call `sample_params`, so for the same seed they crop the same boxes and flip the same
images; only the resampling arithmetic differs. The generator for a sample is seeded from
(seed, epoch, identity), where identity is the sample's "key" when it has one and otherwise a digest
of its encoded bytes. A running index is deliberately not used: each DataLoader worker holds its
own copy of the transform, so a counter would depend on the number of workers and on batching.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from stoker.augment.spec import TransformSpec


@dataclass(frozen=True)
class SampleParams:
    """The random choices for one sample, in the coordinates of the upright (EXIF-oriented) image."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) source region mapped onto the output
    flip: bool
    jitter: tuple[float, float, float]  # brightness, contrast, saturation factors; 1.0 leaves it unchanged


def sample_rng(seed: int, epoch: int, sample: dict) -> random.Random:
    """The generator for one sample; identical in every process, worker count and batch layout."""
    key = sample.get("key")
    identity = key.encode("utf-8") if isinstance(key, str) else bytes(sample["image"])
    digest = hashlib.blake2b(identity, digest_size=16, key=f"{seed}:{epoch}".encode()).digest()
    # random.Random seeds from an int in a few microseconds (numpy's SeedSequence takes ~30).
    return random.Random(int.from_bytes(digest, "little"))


def sample_params(spec: TransformSpec, rng: random.Random, width: int, height: int) -> SampleParams:
    """Draw the crop box, flip and jitter factors for an upright image of `width` x `height`."""
    if spec.mode == "train":
        box = random_resized_crop_box(rng, width, height, spec.scale, spec.ratio)
    else:
        box = center_crop_box(width, height, spec.resize_to, spec.height, spec.width)
    # Always draw, even when p is 0 or 1, so the stream of numbers does not depend on the spec.
    flip = rng.random() < spec.hflip_prob
    jitter = tuple(
        rng.uniform(max(0.0, 1.0 - s), 1.0 + s) if s > 0 else 1.0
        for s in (spec.brightness, spec.contrast, spec.saturation)
    )
    return SampleParams(box=box, flip=flip, jitter=jitter)  # type: ignore[arg-type]


def random_resized_crop_box(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and aspect, then a center crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return (float(left), float(top), float(left + w), float(top + h))
    # Fallback: the largest center crop whose aspect lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (float(left), float(top), float(left + w), float(top + h))


def center_crop_box(width: int, height: int, shorter: int, crop_h: int, crop_w: int) -> tuple[float, float, float, float]:
    """The source region that torchvision's Resize(shorter) + CenterCrop((crop_h, crop_w)) keeps.

    Resampling this (fractional) box straight to the crop size gives the same pixels as resizing the
    whole image and then cropping, while touching only the kept region.
    """
    if width <= height:
        new_w, new_h = shorter, int(shorter * height / width)
    else:
        new_w, new_h = int(shorter * width / height), shorter
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
