"""All backends against each other: deterministic ops agree within a tolerance, random ops crop and flip alike.

Tolerances, in uint8 grey levels of mean absolute difference over a batch (docs/augment.md):
Pillow vs DALI < 0.5 (both antialiased bilinear; only rounding differs), Pillow vs Kornia < 2.0
(Kornia's batched warp is bilinear without antialiasing, so downscaled edges differ).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stoker.augment.params import sample_params, sample_rng
from stoker.augment.registry import available_backends, build_transform
from stoker.augment.spec import TransformSpec
from test_augment_helpers import as_samples, gradient_png, jpeg

BACKENDS = [name for name in ("pil", "dali", "kornia") if name in available_backends()]
TOLERANCE = {"dali": 0.5, "kornia": 2.0}
PHOTOS = as_samples([jpeg(60 + i, 240 + 31 * i, 330 - 19 * i) for i in range(4)])


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "pil"])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_resize_center_crop_and_flip_agree_with_pillow(backend, flip):
    spec = TransformSpec(mode="eval", flip_prob=flip)
    ours = build_transform(spec, backend=backend, device="cpu")(PHOTOS)["image"].float()
    reference = build_transform(spec, backend="pil")(PHOTOS)["image"].float()
    assert (ours - reference).abs().mean().item() <= TOLERANCE[backend]


def _measured_crops(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """From outputs of the x/y gradient image: (crop width, crop height) in source pixels, and flips."""
    red = images[:, 0].float().numpy()  # the source x coordinate (0..255) of each output pixel
    green = images[:, 1].float().numpy()  # the source y coordinate
    middle_row, middle_col = red[:, red.shape[1] // 2, :], green[:, :, green.shape[2] // 2]
    span_x = middle_row[:, -3] - middle_row[:, 2]  # a few pixels in, away from edge clamping
    span_y = middle_col[:, -3] - middle_col[:, 2]
    width, height = images.shape[-1], images.shape[-2]
    # Output columns 2..W-3 cover (W - 5) / W of the crop.
    return np.stack([np.abs(span_x) * width / (width - 5), span_y * height / (height - 5)], 1), span_x < 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crops_and_flips_follow_the_shared_parameters(backend):
    spec = TransformSpec(size=64, scale=(0.25, 1.0))
    image = gradient_png(256, 256)
    samples = [{"image": image, "label": 0, "key": f"k{i}"} for i in range(48)]
    out = build_transform(spec, backend=backend, device="cpu", seed=11)(samples)["image"]
    sizes, flips = _measured_crops(out)
    planned = [sample_params(spec, sample_rng(11, 0, s), 256, 256) for s in samples]
    planned_sizes = np.array([(p.box[2] - p.box[0], p.box[3] - p.box[1]) for p in planned])
    assert np.array_equal(flips, [p.flip for p in planned])
    assert 0.25 < flips.mean() < 0.75
    # Within 2.5 source pixels: one grey level of the gradient is one pixel, plus resampling rounding.
    assert np.abs(sizes - planned_sizes).max() < 2.5
    areas = sizes.prod(1) / 256**2
    assert areas.min() > 0.2 and areas.max() < 1.05
