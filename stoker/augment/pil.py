"""The CPU backend: Pillow (or Pillow-SIMD) decode, crop, resize, flip and jitter, batched into uint8.

Per sample: decode at reduced size (`decode_for_box`), resample the crop box straight to the output
size (one antialiased bilinear resize), flip, jitter, and copy into a preallocated uint8 batch
[B, 3, H, W] (or [B, H, W, 3]). With `num_threads > 1` the samples of a batch run on a thread pool:
Pillow and PyTorch release the GIL while decoding and resizing, so threads scale (docs/augment.md).

Resampling: stock Pillow's resize is the slowest step (about 1 ms for a 224x224 crop), so whole-pixel
crop boxes are resized with PyTorch's antialiased uint8 kernel, a port of Pillow-SIMD's AVX2 code that
matches Pillow to within one grey level and runs about 3x faster. Fractional boxes (eval center
crops, reduced-size decodes) keep Pillow's exact `resize(box=...)`, as does everything when
Pillow-SIMD itself is installed.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch.utils.data import get_worker_info

from stoker.augment.base import BatchTransform, Planned
from stoker.augment.decode import Pixels, as_image, crop, decode_for_box, pil_backend_info
from stoker.augment.spec import TransformSpec
from stoker.shm import batch_buffer, shared_bytes


class PilTransform(BatchTransform):
    """Batch-level collate function that does all the work on CPU with Pillow; outputs CPU tensors."""

    backend = "pil"

    def _run(self, planned: list[Planned]) -> tuple[torch.Tensor, dict[int, BaseException]]:
        spec = self.spec
        chw = spec.layout == "CHW"
        shape = (len(planned), 3, spec.height, spec.width) if chw else (len(planned), spec.height, spec.width, 3)
        batch = _output(shape)

        def work(index: int) -> BaseException | None:
            try:
                pixels = render(planned[index], (spec.width, spec.height))
                batch[index].copy_(pixels if chw else pixels.permute(1, 2, 0))
            except Exception as exc:  # noqa: BLE001 - a corrupt file can fail anywhere inside Pillow
                return exc
            return None

        results = self._map(work, list(range(len(planned))))
        failed = {i: exc for i, exc in enumerate(results) if exc is not None}
        if failed:
            batch = batch[[i for i in range(len(planned)) if i not in failed]]
        return _finish(batch, spec), failed


def _output(shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 batch to fill: in a DataLoader worker, straight in shared memory, so that sending it to the
    training process does not copy the pixels; in stoker.DataLoader's workers, in a reusable slab (fresh shared
    pages would be faulted in and zero-filled for every batch: about 8% of the per-image work)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    pooled = batch_buffer(math.prod(shape))
    if pooled is not None:
        return pooled.view(shape)
    return shared_bytes(math.prod(shape)).view(shape)


def render(item: Planned, out_size: tuple[int, int]) -> torch.Tensor:
    """One sample's output pixels, uint8 [3, H, W]: reduced decode, one resample of the crop box, flip, jitter."""
    image, box = decode_for_box(item.image, item.header, item.params.box, out_size)
    pixels = resample(image, box, out_size)
    if item.params.flip:
        pixels = pixels.flip(-1)
    if item.params.jitter != (1.0, 1.0, 1.0):
        jittered = jitter(Image.fromarray(pixels.permute(1, 2, 0).numpy()), item.params.jitter)
        pixels = torch.from_numpy(np.array(jittered)).permute(2, 0, 1)
    return pixels


def resample(image: Pixels, box: tuple[float, float, float, float], out_size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of `box` in an RGB image to `out_size` (w, h); returns uint8 [3, H, W]."""
    if _pillow_is_simd() or not all(float(v).is_integer() for v in box):
        resized = as_image(image).resize(out_size, Image.Resampling.BILINEAR, box=box)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)
    region = torch.from_numpy(crop(image, tuple(int(v) for v in box)))
    # HWC memory viewed as NCHW is channels-last, the layout PyTorch's fast uint8 kernel reads.
    resized = F.interpolate(
        region.permute(2, 0, 1).unsqueeze(0), size=(out_size[1], out_size[0]), mode="bilinear", antialias=True
    )
    return resized[0]


@functools.cache
def _pillow_is_simd() -> bool:
    return pil_backend_info()["simd"]


def jitter(image: Image.Image, factors: tuple[float, float, float]) -> Image.Image:
    """Brightness, then contrast, then saturation, with torchvision's (ImageEnhance) semantics."""
    brightness, contrast, saturation = factors
    if brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(brightness)
    if contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(contrast)
    if saturation != 1.0:
        image = ImageEnhance.Color(image).enhance(saturation)
    return image


def _finish(batch: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """uint8 batch already in the spec's layout -> the spec's dtype and normalization."""
    if spec.dtype == "uint8":
        return batch
    images = batch.to(torch.float32).div_(255.0)
    if spec.mean is not None and spec.std is not None:
        shape = (1, 3, 1, 1) if spec.layout == "CHW" else (1, 1, 1, 3)
        images = images.sub_(torch.tensor(spec.mean).view(shape)).div_(torch.tensor(spec.std).view(shape))
    return images
