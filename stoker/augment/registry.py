"""`build_transform`: pick a backend, check the combination, and return a ready collate function.

Backends are imported only when chosen, so `import stoker` never pays for DALI or Kornia.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from stoker.augment.base import BatchTransform
from stoker.augment.spec import TransformSpec
from stoker.errors import ConfigError, MissingExtraError


@dataclass(frozen=True)
class Backend:
    """Where a backend lives and what it needs installed."""

    module: str  # the stoker module that defines `transform_class`
    transform_class: str
    requires: str | None  # third-party module the backend imports
    package: str | None  # pip package that provides it (all in the `gpu` extra)
    gpu_capable: bool


BACKENDS: dict[str, Backend] = {
    "pil": Backend("stoker.augment.pil", "PilTransform", None, None, gpu_capable=False),
    "dali": Backend("stoker.augment.dali", "DaliTransform", "nvidia.dali", "nvidia-dali-cuda120", gpu_capable=True),
    "kornia": Backend("stoker.augment.kornia", "KorniaTransform", "kornia", "kornia", gpu_capable=True),
}


def is_installed(name: str) -> bool:
    """True when backend `name`'s third-party dependency imports."""
    requires = BACKENDS[name].requires
    if requires is None:
        return True
    try:
        importlib.import_module(requires)
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are installed on this machine."""
    return [name for name in BACKENDS if is_installed(name)]


def build_transform(
    spec: TransformSpec | None = None,
    backend: str = "auto",
    *,
    device: str | None = None,
    seed: int = 0,
    num_threads: int = 1,
) -> BatchTransform:
    """Return a picklable batch-level collate function applying `spec` with the chosen backend.

    backend: "pil", "dali", "kornia", or "auto" (DALI on a CUDA GPU if installed, else Kornia on a
    CUDA GPU, else Pillow). device: "cpu", "cuda" or "cuda:N"; None means the GPU when the backend
    can use one and one is available. seed: the base of every per-sample random choice.
    num_threads: decode threads inside one call (Pillow and Kornia) or DALI's CPU thread count.
    """
    spec = spec if spec is not None else TransformSpec()
    if not isinstance(spec, TransformSpec):
        raise ConfigError(f"spec must be a TransformSpec, got {type(spec).__name__}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"num_threads must be a positive int, got {num_threads!r}")
    parsed = _parse_device(device)
    name = _choose(backend, parsed)
    info = BACKENDS[name]
    if not is_installed(name):
        raise MissingExtraError(f"the {name!r} augment backend", "gpu", info.package or name)
    resolved = _resolve_device(name, parsed)
    cls = getattr(importlib.import_module(info.module), info.transform_class)
    return cls(spec, seed=seed, device=resolved, num_threads=num_threads)


def _parse_device(device: str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return parsed


def _choose(backend: str, device: torch.device | None) -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        return backend
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        for name in ("dali", "kornia"):  # fastest first: DALI decodes JPEG on the GPU itself
            if is_installed(name):
                return name
    return "pil"


def _resolve_device(name: str, parsed: torch.device | None) -> str:
    cuda = torch.cuda.is_available()
    if parsed is None:
        return "cuda:0" if BACKENDS[name].gpu_capable and cuda else "cpu"
    device = str(parsed)
    if parsed.type == "cpu":
        return "cpu"
    if not BACKENDS[name].gpu_capable:
        raise ConfigError(
            f"the {name!r} backend only produces CPU tensors; use device='cpu' and move batches in the training "
            "loop, or choose backend='dali' or 'kornia' for GPU augmentation"
        )
    if not cuda:
        raise ConfigError(f"device={device!r} needs a CUDA GPU, but torch.cuda.is_available() is False")
    index = parsed.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return f"cuda:{index}"
