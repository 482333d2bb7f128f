"""build_transform: backend choice, missing extras, and invalid combinations caught at build time."""

from __future__ import annotations

import sys

import pytest
import torch

import stoker
from stoker.augment.pil import PilTransform
from stoker.augment.registry import available_backends, build_transform
from stoker.augment.spec import TransformSpec
from stoker.errors import ConfigError, MissingExtraError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour on a machine without CUDA")


def test_package_exports_the_spec_and_the_builder():
    assert stoker.TransformSpec is TransformSpec and stoker.build_transform is build_transform


@no_cuda
def test_auto_picks_pillow_without_a_gpu():
    transform = build_transform(TransformSpec(), backend="auto")
    assert isinstance(transform, PilTransform) and transform.device == "cpu"
    assert build_transform().spec == TransformSpec()


def test_explicit_backends_on_cpu():
    assert "pil" in available_backends()
    for name in available_backends():
        transform = build_transform(TransformSpec(size=32), backend=name, device="cpu", seed=4, num_threads=2)
        assert transform.backend == name and transform.device == "cpu" and transform.seed == 4


@pytest.mark.parametrize("backend, module", [("dali", "nvidia.dali"), ("kornia", "kornia")])
def test_missing_backend_names_the_gpu_extra(monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=r"stoker\[gpu\]") as info:
        build_transform(TransformSpec(), backend=backend, device="cpu")
    assert info.value.extra == "gpu" and isinstance(info.value, ImportError)
    assert backend not in available_backends()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": "opencv"}, "unknown backend"),
        ({"backend": "pil", "device": "cuda"}, "only produces CPU tensors"),
        ({"backend": "pil", "device": "tpu"}, "device must be"),
        ({"backend": "pil", "num_threads": 0}, "num_threads"),
        ({"backend": "pil", "seed": -1}, "seed"),
    ],
)
def test_invalid_combinations_fail_at_build_time(options, message):
    with pytest.raises(ConfigError, match=message):
        build_transform(TransformSpec(), **options)


def test_spec_must_be_a_transform_spec():
    with pytest.raises(ConfigError, match="TransformSpec"):
        build_transform({"size": 224})  # type: ignore[arg-type]


@no_cuda
@pytest.mark.parametrize("backend", ["kornia", "dali"])
def test_gpu_device_without_a_gpu_fails_at_build_time(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_transform(TransformSpec(), backend=backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_prefers_dali_then_kornia_on_a_gpu():
    transform = build_transform(TransformSpec(), backend="auto")
    expected = "dali" if "dali" in available_backends() else "kornia" if "kornia" in available_backends() else "pil"
    assert transform.backend == expected
    assert transform.device == ("cpu" if expected == "pil" else "cuda:0")
