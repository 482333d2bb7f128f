"""The DALI backend: encoded bytes go into a DALI pipeline that decodes, crops, resizes, flips and normalizes.

The pipeline is fed with `fn.external_source` per batch: the encoded bytes plus the per-sample crop
box, flip and jitter factors drawn by `stoker.augment.params` (so DALI crops exactly where the other
backends crop). Decoding uses `device="mixed"` (nvJPEG on the GPU) when the transform's device is
CUDA and `device="cpu"` otherwise. The pipeline is built lazily, once per process, because
DataLoader workers are separate processes and a pipeline cannot be pickled.

DALI reports a bad image as a failure of the whole batch (and the pipeline is then unusable); the
transform rebuilds it, finds the culprits by running the samples one at a time, applies the error
policy to them and runs the rest again.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np
import torch

from stoker.augment.base import BatchTransform, Planned
from stoker.augment.decode import decode_full
from stoker.augment.spec import TransformSpec


class DaliTransform(BatchTransform):
    """Batch-level collate function backed by an NVIDIA DALI pipeline; outputs tensors on `device`."""

    backend = "dali"

    def __init__(self, spec: TransformSpec, *, seed: int = 0, device: str = "cpu", num_threads: int = 1) -> None:
        super().__init__(spec, seed=seed, device=device, num_threads=num_threads)
        self._pipe: Any = None
        self._pipe_batch = 0

    def _process_local(self) -> Iterable[str]:
        return ("_executor", "_pipe")

    def _run(self, planned: list[Planned]) -> tuple[torch.Tensor, dict[int, BaseException]]:
        try:
            return self._run_pipeline(planned), {}
        except RuntimeError:
            self._pipe = None  # DALI: "Current pipeline object is no longer valid" after an error
        # DALI fails the whole batch: find the culprits by running the samples one at a time.
        failed: dict[int, BaseException] = {}
        for index, item in enumerate(planned):
            try:
                self._run_pipeline([item])
            except RuntimeError as exc:
                self._pipe = None
                failed[index] = _explain(item, exc)
                if self.spec.on_error == "raise":
                    return self._empty(), failed  # the base class raises it
        good = [item for index, item in enumerate(planned) if index not in failed]
        return (self._run_pipeline(good) if good else self._empty()), failed

    def _run_pipeline(self, items: list[Planned]) -> torch.Tensor:
        self._in_new_process()
        if self._pipe is None or self._pipe_batch < len(items):
            self._pipe_batch = max(len(items), self._pipe_batch)
            self._pipe = _build_pipeline(self.spec, self._pipe_batch, self.num_threads, self.device)
        pipe = self._pipe
        pipe.feed_input("encoded", [np.frombuffer(p.data, np.uint8) for p in items])
        # DALI's resize takes the region of interest in (y, x) order, matching size=[height, width].
        pipe.feed_input("roi", [np.array([b[1], b[0], b[3], b[2]], np.float32) for b in (p.params.box for p in items)])
        pipe.feed_input("mirror", [np.array(p.params.flip, np.int32) for p in items])
        if self.spec.has_jitter:
            pipe.feed_input("jitter", [np.array(p.params.jitter, np.float32) for p in items])
        (output,) = pipe.run()
        return _to_torch(output, getattr(torch, self.spec.dtype), torch.device(self.device))

    def _empty(self) -> torch.Tensor:
        spec = self.spec
        shape = (0, 3, spec.height, spec.width) if spec.layout == "CHW" else (0, spec.height, spec.width, 3)
        return torch.zeros(shape, dtype=getattr(torch, spec.dtype), device=self.device)


def _explain(item: Planned, exc: RuntimeError) -> BaseException:
    """The most useful reason a sample failed in DALI: Pillow's error if Pillow fails too, else DALI's."""
    try:
        decode_full(item.data, max_pixels=item.header.width * item.header.height)
    except Exception as pillow_error:  # noqa: BLE001 - any failure decoding foreign bytes is the reason
        return pillow_error
    # DALI's message holds a pipeline traceback; the reason follows "encountered:".
    reason = re.search(r"encountered:\s*(.+)", str(exc))
    return RuntimeError(
        f"DALI cannot decode this {item.header.format or 'unknown'} image (Pillow can; DALI reads JPEG, PNG, "
        f"WebP, TIFF, BMP, PNM and JPEG 2000): {reason.group(1) if reason else str(exc).splitlines()[-1]}"
    )


def _build_pipeline(spec: TransformSpec, batch_size: int, num_threads: int, device: str) -> Any:
    """One DALI pipeline for `spec`: external sources -> decode -> resize(roi) -> jitter -> crop_mirror_normalize."""
    import nvidia.dali as dali
    from nvidia.dali import fn, types

    gpu = device.startswith("cuda")
    device_id = (torch.device(device).index or 0) if gpu else None
    pipe = dali.Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        roi = fn.external_source(name="roi", dtype=types.FLOAT)
        mirror = fn.external_source(name="mirror", dtype=types.INT32)
        # adjust_orientation (DALI's default) honours EXIF orientation, as the Pillow backends do.
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(
            images,
            size=[spec.height, spec.width],
            roi_start=roi[0:2],
            roi_end=roi[2:4],
            roi_relative=False,
            antialias=True,
            interp_type=types.INTERP_LINEAR,
        )
        if spec.has_jitter:
            factors = fn.external_source(name="jitter", dtype=types.FLOAT)
            images = _jitter(images, factors.gpu() if gpu else factors)
        if spec.mean is not None and spec.std is not None:
            mean, std = [255.0 * m for m in spec.mean], [255.0 * s for s in spec.std]
        else:
            mean, std = [0.0], [255.0 if spec.dtype == "float32" else 1.0]
        images = fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            mean=mean,
            std=std,
            dtype=types.FLOAT if spec.dtype == "float32" else types.UINT8,
            output_layout=spec.layout,
        )
        pipe.set_outputs(images)
    pipe.build()
    return pipe


def _jitter(images: Any, factors: Any) -> Any:
    """torchvision colour jitter with DALI arithmetic: brightness scales, contrast and saturation blend with gray."""
    import nvidia.dali as dali
    from nvidia.dali import fn

    def gray(x: Any) -> Any:
        return x[:, :, 0] * 0.299 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114

    x = dali.math.clamp(images * factors[0], 0.0, 255.0)
    mean = fn.reductions.mean(gray(x))
    x = dali.math.clamp(x * factors[1] + mean * (1.0 - factors[1]), 0.0, 255.0)
    x = dali.math.clamp(x * factors[2] + gray(x)[:, :, dali.newaxis] * (1.0 - factors[2]), 0.0, 255.0)
    return x


def _to_torch(output: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Copy a DALI TensorList into a new torch tensor on `device` (DALI reuses its buffers next batch)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = output.as_tensor()
    result = torch.empty(tensor.shape(), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, result, cuda_stream=stream)
    return result
