"""`TransformSpec`: one backend-independent description of a decode + augment pipeline.

Every backend (Pillow, DALI, Kornia) reads the same spec and draws the same random parameters
(see `stoker.augment.params`), so switching backends changes speed, not the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stoker.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's evaluation convention: resize the shorter side to size / 0.875 (256 for 224), then center-crop.
_EVAL_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class TransformSpec:
    """What to do to every image in a batch; validated when constructed.

    mode="train": RandomResizedCrop(size, scale, ratio) with torchvision's semantics, then a horizontal
    flip with probability `flip_prob` (default 0.5), then optional colour jitter.
    mode="eval": resize the shorter side to `resize` (default size / 0.875), center-crop `size`,
    flip with probability `flip_prob` (default 0).
    Output: uint8 in [0, 255], or float32 in [0, 1] normalized by `mean`/`std` when given.
    """

    size: int | tuple[int, int] = 224
    mode: Literal["train", "eval"] = "train"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | None = None
    flip_prob: float | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    dtype: Literal["uint8", "float32"] = "uint8"
    layout: Literal["CHW", "HWC"] = "CHW"
    # 64 Mpx: above any real photo, below Pillow's own warning threshold (89 Mpx), so ours fires first.
    max_pixels: int = 64_000_000
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def height(self) -> int:
        """Output height in pixels."""
        return self.size if isinstance(self.size, int) else self.size[0]

    @property
    def width(self) -> int:
        """Output width in pixels."""
        return self.size if isinstance(self.size, int) else self.size[1]

    @property
    def resize_to(self) -> int:
        """Eval mode: the shorter side after resizing, before the center crop."""
        if self.resize is not None:
            return self.resize
        return int(round(max(self.height, self.width) / _EVAL_CROP_FRACTION))

    @property
    def hflip_prob(self) -> float:
        """Probability of a horizontal flip (the mode's default when `flip_prob` is None)."""
        if self.flip_prob is not None:
            return self.flip_prob
        return 0.5 if self.mode == "train" else 0.0

    @property
    def has_jitter(self) -> bool:
        """True when any colour-jitter strength is non-zero."""
        return bool(self.brightness or self.contrast or self.saturation)


def _validate(spec: TransformSpec) -> None:
    size = (spec.size, spec.size) if isinstance(spec.size, int) else tuple(spec.size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"size must be a positive int or (height, width) of positive ints, got {spec.size!r}")
    if spec.mode not in ("train", "eval"):
        raise ConfigError(f"mode must be 'train' or 'eval', got {spec.mode!r}")
    lo, hi = spec.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"scale must satisfy 0 < min <= max <= 1 (fractions of the image area), got {spec.scale!r}")
    rlo, rhi = spec.ratio
    if not 0 < rlo <= rhi:
        raise ConfigError(f"ratio must satisfy 0 < min <= max (width / height), got {spec.ratio!r}")
    if spec.resize is not None:
        if spec.mode != "eval":
            raise ConfigError("resize is only used in mode='eval'; RandomResizedCrop picks its own scale")
        if not isinstance(spec.resize, int) or spec.resize <= 0:
            raise ConfigError(f"resize must be a positive int, got {spec.resize!r}")
    if spec.mode == "eval" and spec.resize_to < max(size):
        raise ConfigError(
            f"center crop {size[0]}x{size[1]} is larger than the resized shorter side {spec.resize_to}; "
            f"use resize >= {max(size)}"
        )
    if spec.flip_prob is not None and not 0.0 <= spec.flip_prob <= 1.0:
        raise ConfigError(f"flip_prob must be in [0, 1], got {spec.flip_prob!r}")
    for name in ("brightness", "contrast", "saturation"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{name} must be a non-negative number (factor drawn from [1-x, 1+x]), got {value!r}")
    if (spec.mean is None) != (spec.std is None):
        raise ConfigError("give both mean and std, or neither")
    if spec.mean is not None and spec.std is not None:
        if len(spec.mean) != 3 or len(spec.std) != 3:
            raise ConfigError("mean and std need one value per RGB channel (3 values each)")
        if any(s <= 0 for s in spec.std):
            raise ConfigError(f"std values must be positive, got {spec.std!r}")
        if spec.dtype != "float32":
            raise ConfigError("mean/std normalization needs dtype='float32'; uint8 cannot hold normalized values")
    if spec.dtype not in ("uint8", "float32"):
        raise ConfigError(f"dtype must be 'uint8' or 'float32', got {spec.dtype!r}")
    if spec.layout not in ("CHW", "HWC"):
        raise ConfigError(f"layout must be 'CHW' or 'HWC', got {spec.layout!r}")
    if not isinstance(spec.max_pixels, int) or spec.max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive int, got {spec.max_pixels!r}")
    if spec.on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {spec.on_error!r}")
