"""TransformSpec validation and the per-sample random parameters every backend shares."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from stoker.augment.params import center_crop_box, random_resized_crop_box, sample_params, sample_rng
from stoker.augment.spec import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from stoker.errors import ConfigError
from test_augment_helpers import photo


def test_defaults_describe_imagenet_training():
    spec = TransformSpec()
    assert (spec.height, spec.width) == (224, 224)
    assert spec.hflip_prob == 0.5 and not spec.has_jitter
    evaluation = TransformSpec(mode="eval")
    assert evaluation.resize_to == 256 and evaluation.hflip_prob == 0.0
    assert TransformSpec(size=(160, 128), mode="eval").resize_to == 183


def test_spec_is_frozen_and_hashable():
    spec = TransformSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 128  # type: ignore[misc]
    assert hash(spec) == hash(TransformSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="float32"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": 0}, "size"),
        ({"size": (224,)}, "size"),
        ({"mode": "test"}, "mode"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.5, 1.5)}, "scale"),
        ({"ratio": (1.5, 1.0)}, "ratio"),
        ({"mode": "eval", "resize": 200}, "larger than the resized"),
        ({"resize": 256}, "only used in mode='eval'"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"brightness": -0.1}, "brightness"),
        ({"mean": IMAGENET_MEAN}, "both mean and std"),
        ({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, "float32"),
        ({"mean": (0.5,), "std": (0.5,), "dtype": "float32"}, "3 values"),
        ({"mean": IMAGENET_MEAN, "std": (0.2, 0.0, 0.2), "dtype": "float32"}, "positive"),
        ({"dtype": "float16"}, "dtype"),
        ({"layout": "NCHW"}, "layout"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_invalid_specs_fail_when_built(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        TransformSpec(**options)
    assert isinstance(info.value, ValueError)


def test_center_crop_box_reproduces_resize_then_center_crop():
    image = photo(0, 375, 500)
    box = center_crop_box(500, 375, 256, 224, 224)
    # torchvision: Resize(256) (shorter side, long side truncated) then CenterCrop(224).
    resized = image.resize((341, 256), Image.Resampling.BILINEAR)
    top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.int16)
    direct = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR, box=box), np.int16)
    assert np.abs(direct - expected).max() <= 1


def _torchvision_get_params(generator: torch.Generator, width: int, height: int) -> tuple[int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed; returns (w, h)."""
    area = height * width
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(0.08, 1.0, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return w, h
    return width, height  # fallback; these sizes make it rare


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_random_resized_crop_matches_torchvision_distribution():
    width, height, n = 640, 480, 3000
    rng = random.Random(0)
    ours = np.array([random_resized_crop_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    generator = torch.Generator().manual_seed(0)
    theirs = np.array([_torchvision_get_params(generator, width, height) for _ in range(n)])
    ours_w, ours_h = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    assert (ours[:, 0] >= 0).all() and (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    ours_area = ours_w * ours_h / (width * height)
    theirs_area = theirs[:, 0] * theirs[:, 1] / (width * height)
    assert ours_area.min() >= 0.07 and ours_area.max() <= 1.0
    # Two-sample KS at n=3000 each: 0.05 is far above the ~0.035 critical value at p=0.01.
    assert _ks_statistic(ours_area, theirs_area) < 0.05
    assert _ks_statistic(np.log(ours_w / ours_h), np.log(theirs[:, 0] / theirs[:, 1])) < 0.05


def test_random_resized_crop_falls_back_to_a_center_crop_within_ratio():
    rng = random.Random(0)
    # A 1000x50 strip: no crop of the drawn aspect fits in 10 tries, so the fallback clamps to 4/3.
    box = random_resized_crop_box(rng, 1000, 50, (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == (466.0, 0.0, 533.0, 50.0)  # width round(50 * 4/3) = 67, left (1000 - 67) // 2
    assert random_resized_crop_box(rng, 1, 1, (0.08, 1.0), (3 / 4, 4 / 3)) == (0.0, 0.0, 1.0, 1.0)


def test_sample_rng_depends_on_seed_epoch_and_key_only():
    sample = {"image": b"bytes", "label": 0, "key": "a"}
    spec = TransformSpec(brightness=0.4)

    def draw(seed, epoch, s):
        return sample_params(spec, sample_rng(seed, epoch, s), 500, 400)

    assert draw(0, 0, sample) == draw(0, 0, dict(sample, label=7, shard="other"))
    assert draw(0, 0, sample) != draw(1, 0, sample)
    assert draw(0, 0, sample) != draw(0, 1, sample)
    assert draw(0, 0, sample) != draw(0, 0, dict(sample, key="b"))
    # Without a key, the bytes identify the sample.
    keyless = {"image": b"bytes", "label": 0}
    assert draw(0, 0, keyless) == draw(0, 0, dict(keyless))
    assert draw(0, 0, keyless) != draw(0, 0, {"image": b"other", "label": 0})


def test_flip_and_jitter_statistics():
    spec = TransformSpec(brightness=0.4, contrast=0.2, saturation=0.0)
    draws = [sample_params(spec, random.Random(i), 300, 300) for i in range(2000)]
    flips = np.mean([d.flip for d in draws])
    assert 0.46 < flips < 0.54
    brightness = np.array([d.jitter[0] for d in draws])
    assert brightness.min() >= 0.6 and brightness.max() <= 1.4 and abs(brightness.mean() - 1.0) < 0.02
    assert all(0.8 <= d.jitter[1] <= 1.2 and d.jitter[2] == 1.0 for d in draws)
    evaluation = [sample_params(TransformSpec(mode="eval"), random.Random(i), 300, 300) for i in range(100)]
    assert not any(d.flip for d in evaluation) and len({d.box for d in evaluation}) == 1
