"""`BatchTransform`: what every backend shares.

A transform is a batch-level collate function for `torch.utils.data.DataLoader`:

    transform(samples: list[dict]) -> {"image": Tensor[B, C, H, W] (or [B, H, W, C]),
                                       "label": int64 Tensor[B], "skipped": int, "key": list[str]}

Each sample is {"image": encoded bytes, "label": int, optionally "key": str, "shard": str}. The base
class reads headers, draws the per-sample random parameters and applies the error policy; a backend
only turns planned samples into pixels (`_run`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from PIL import Image

from stoker.augment.decode import DecodeError, Header, probe
from stoker.augment.params import SampleParams, sample_params, sample_rng
from stoker.augment.spec import TransformSpec

logger = logging.getLogger(__name__)


@dataclass
class Planned:
    """One sample after its header was read and its random parameters drawn."""

    sample: dict
    image: Image.Image  # opened lazily: only the header has been read
    header: Header
    params: SampleParams

    @property
    def data(self) -> bytes:
        """The encoded image bytes."""
        return self.sample["image"]


class BatchTransform:
    """Base of every backend: picklable, seeded, applies `spec` to whole batches of encoded images."""

    backend: ClassVar[str] = ""

    def __init__(self, spec: TransformSpec, *, seed: int = 0, device: str = "cpu", num_threads: int = 1) -> None:
        self.spec = spec
        self.seed = seed
        self.device = device
        self.num_threads = num_threads
        self.epoch = 0
        self.skipped = 0  # samples dropped by on_error="skip" in this process
        self._executor: ThreadPoolExecutor | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, seed={self.seed}, device={self.device!r})"

    def set_epoch(self, epoch: int) -> None:
        """Change the random parameters for a new epoch (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    # Pickling: threads and pipelines belong to one process; workers rebuild them lazily.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._process_local():
            state[name] = None
        return state

    def _process_local(self) -> Iterable[str]:
        return ("_executor",)

    def _in_new_process(self) -> bool:
        # After fork, or in a spawned worker, every process-local resource must be rebuilt.
        if self._owner_pid != os.getpid():
            for name in self._process_local():
                setattr(self, name, None)
            self._owner_pid = os.getpid()
            return True
        return False

    def _map(self, fn: Callable[[Any], Any], items: list) -> list:
        """`[fn(x) for x in items]`, on `num_threads` threads (Pillow releases the GIL while decoding)."""
        self._in_new_process()
        if self.num_threads <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_threads, thread_name_prefix="stoker-decode")
        return list(self._executor.map(fn, items))

    def __call__(self, samples: list[dict]) -> dict:
        """Decode and augment a batch; see the module docstring for the input and output contract."""
        return self._collate(samples, self._run)

    def _collate(self, samples: list[dict], run: Callable[[list[Planned]], tuple[Any, dict]]) -> dict:
        planned: list[Planned] = []
        errors: list[DecodeError] = []
        for index, sample in enumerate(samples):
            _check_sample(index, sample)
            try:
                image, header = probe(sample["image"], self.spec.max_pixels)
            except Exception as exc:  # noqa: BLE001 - any failure reading foreign bytes is a bad sample
                errors.append(self._fail(sample, exc))
                continue
            rng = sample_rng(self.seed, self.epoch, sample)
            planned.append(Planned(sample, image, header, sample_params(self.spec, rng, header.width, header.height)))
        images, failed = run(planned)
        errors += [self._fail(planned[i].sample, exc) for i, exc in sorted(failed.items())]
        kept = [p.sample for i, p in enumerate(planned) if i not in failed]
        self.skipped += len(errors)
        batch = {
            "image": images,
            "label": torch.tensor([int(s["label"]) for s in kept], dtype=torch.int64),
            "skipped": len(errors),
        }
        if all("key" in s for s in samples):
            batch["key"] = [s["key"] for s in kept]
        return batch

    def _fail(self, sample: dict, exc: BaseException) -> DecodeError:
        error = exc if isinstance(exc, DecodeError) else DecodeError(
            f"cannot decode image: {type(exc).__name__}: {exc}", key=sample.get("key"), shard=sample.get("shard")
        )
        if self.spec.on_error == "raise":
            raise error from (None if exc is error else exc)
        logger.warning("skipping a sample (on_error='skip'): %s", error)
        return error

    def _run(self, planned: list[Planned]) -> tuple[torch.Tensor, dict[int, BaseException]]:
        """Turn planned samples into the output tensor; rows for failed samples are left out."""
        raise NotImplementedError


def _check_sample(index: int, sample: Any) -> None:
    if not isinstance(sample, dict) or "image" not in sample or "label" not in sample:
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise TypeError(f"sample {index} must be a dict with 'image' (encoded bytes) and 'label' (int); got {got}")
    if not isinstance(sample["image"], (bytes, bytearray, memoryview)):
        raise TypeError(f"sample {index}: 'image' must be encoded bytes, got {type(sample['image']).__name__}")
