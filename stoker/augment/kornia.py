"""The Kornia backend: the CPU only decodes; crop, resize, flip, jitter and normalize run batched on the device.

Stage 1 (`decode`, CPU, threads): each image is decoded at reduced size (`decode_for_box`) and only
the pixels around its crop box are copied into one padded uint8 batch [B, Hc, Wc, 3].
Stage 2 (`augment`, device): one pinned, non-blocking copy to the GPU, then a single batched
`warp_affine` does crop + resize + flip for every sample at once, followed by Kornia's colour ops.

Calling the transform runs both stages. To keep GPU work out of DataLoader worker processes, use
`collate_fn=transform.decode` in the loader (with pin_memory=True) and call `transform.augment(batch)`
in the training loop. Random parameters come from `stoker.augment.params` rather than from
`kornia.augmentation`'s global torch RNG, so results are reproducible per sample and match the other
backends crop for crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import get_worker_info

from stoker.augment.base import BatchTransform, Planned
from stoker.augment.decode import crop, decode_for_box, size_of


@dataclass
class HostBatch:
    """Stage-1 output: decoded crop regions padded into one uint8 array, plus per-sample parameters."""

    pixels: torch.Tensor  # uint8 [B, Hc, Wc, 3]; sample i occupies [:h_i + 1, :w_i + 1] (edge replicated)
    boxes: torch.Tensor  # float32 [B, 4]: (x0, y0, x1, y1) of the crop inside each region
    flips: torch.Tensor  # bool [B]
    jitter: torch.Tensor  # float32 [B, 3]: brightness, contrast, saturation factors

    def pin_memory(self) -> HostBatch:
        """Called by DataLoader(pin_memory=True): page-lock the pixels for an asynchronous copy."""
        return replace(self, pixels=self.pixels.pin_memory())


class KorniaTransform(BatchTransform):
    """Batch-level collate function: Pillow decode on CPU, batched Kornia augmentation on `device`."""

    backend = "kornia"

    def decode(self, samples: list[dict]) -> dict:
        """Stage 1 only: like calling the transform, but batch["image"] is a `HostBatch`."""
        return self._collate(samples, self._decode_host)

    def augment(self, batch: dict) -> dict:
        """Stage 2 only: turn the `HostBatch` from `decode` into the final image tensor on `device`."""
        return {**batch, "image": self._augment(batch["image"])}

    def _run(self, planned: list[Planned]) -> tuple[torch.Tensor, dict[int, BaseException]]:
        host, failed = self._decode_host(planned)
        return self._augment(host), failed

    def _decode_host(self, planned: list[Planned]) -> tuple[HostBatch, dict[int, BaseException]]:
        out_size = (self.spec.width, self.spec.height)

        def work(item: Planned) -> tuple[np.ndarray, tuple[float, ...]] | BaseException:
            try:
                return _decode_region(item, out_size)
            except Exception as exc:  # noqa: BLE001 - a corrupt file can fail anywhere inside Pillow
                return exc

        results = self._map(work, planned)
        failed = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
        kept = [(planned[i], r) for i, r in enumerate(results) if i not in failed]
        # +1 row and column so bilinear taps just past a region's edge read a replica, not padding.
        hc = max((r[0].shape[0] for _, r in kept), default=1) + 1
        wc = max((r[0].shape[1] for _, r in kept), default=1) + 1
        # Pinning needs CUDA in this process: in a DataLoader worker, leave it to DataLoader(pin_memory=True).
        pin = self.device.startswith("cuda") and get_worker_info() is None
        pixels = torch.zeros((len(kept), hc, wc, 3), dtype=torch.uint8, pin_memory=pin)
        canvas = pixels.numpy()
        for row, (_, (region, _)) in enumerate(kept):
            h, w = region.shape[:2]
            canvas[row, :h, :w] = region
            canvas[row, h, :w] = region[h - 1]
            canvas[row, : h + 1, w] = canvas[row, : h + 1, w - 1]
        host = HostBatch(
            pixels=pixels,
            boxes=torch.tensor([r[1] for _, r in kept], dtype=torch.float32).reshape(-1, 4),
            flips=torch.tensor([p.params.flip for p, _ in kept], dtype=torch.bool),
            jitter=torch.tensor([p.params.jitter for p, _ in kept], dtype=torch.float32).reshape(-1, 3),
        )
        return host, failed

    def _augment(self, host: HostBatch) -> torch.Tensor:
        import kornia

        spec, device = self.spec, torch.device(self.device)
        pixels = host.pixels.to(device, non_blocking=True)
        images = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        matrix = _affine(host.boxes, host.flips, spec.width, spec.height).to(device)
        if len(images):
            images = kornia.geometry.transform.warp_affine(
                images, matrix, (spec.height, spec.width), mode="bilinear", padding_mode="border", align_corners=True
            ).clamp_(0.0, 1.0)
        else:
            images = images.new_zeros((0, 3, spec.height, spec.width))
        if spec.has_jitter and len(images):
            factors = host.jitter.to(device)
            # torchvision's brightness multiplies (kornia's adjust_brightness adds), so it is written out.
            images = (images * factors[:, 0].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
            images = kornia.enhance.adjust_contrast_with_mean_subtraction(images, factors[:, 1])
            images = kornia.enhance.adjust_saturation_with_gray_subtraction(images, factors[:, 2])
        if spec.dtype == "uint8":
            images = images.mul_(255.0).round_().to(torch.uint8)
        elif spec.mean is not None and spec.std is not None:
            mean = torch.tensor(spec.mean, device=device)
            std = torch.tensor(spec.std, device=device)
            images = kornia.enhance.normalize(images, mean, std)
        if spec.layout == "HWC":
            images = images.permute(0, 2, 3, 1)
        return images.contiguous()


def _decode_region(item: Planned, out_size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Decode one sample and cut out its crop box plus a one-pixel margin; return pixels and box in them."""
    image, box = decode_for_box(item.image, item.header, item.params.box, out_size)
    x0, y0 = max(0, math.floor(box[0]) - 1), max(0, math.floor(box[1]) - 1)
    width, height = size_of(image)
    x1, y1 = min(width, math.ceil(box[2]) + 1), min(height, math.ceil(box[3]) + 1)
    region = crop(image, (x0, y0, x1, y1))
    return region, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)


def _affine(boxes: torch.Tensor, flips: torch.Tensor, out_w: int, out_h: int) -> torch.Tensor:
    """Per-sample 2x3 matrices mapping region pixels to output pixels (Kornia's warp_affine convention).

    Output pixel centres are spread evenly over the box, as Pillow and DALI do:
    x_src = x0 + (x_out + 0.5) * sx - 0.5 with sx = box width / output width; a flip mirrors x_out.
    """
    sx = (boxes[:, 2] - boxes[:, 0]) / out_w
    sy = (boxes[:, 3] - boxes[:, 1]) / out_h
    tx = boxes[:, 0] + 0.5 * sx - 0.5
    ty = boxes[:, 1] + 0.5 * sy - 0.5
    # Flipped: x_src = -sx * x_out + (tx + sx * (out_w - 1)).
    sign = torch.where(flips, -1.0, 1.0)
    tx = torch.where(flips, tx + sx * (out_w - 1), tx)
    matrix = torch.zeros((len(boxes), 2, 3), dtype=torch.float32)
    # Inverse of x_src = a * x_out + t is x_out = x_src / a - t / a.
    matrix[:, 0, 0] = sign / sx
    matrix[:, 0, 2] = -tx * sign / sx
    matrix[:, 1, 1] = 1.0 / sy
    matrix[:, 1, 2] = -ty / sy
    return matrix
