"""The Kornia backend on CPU tensors: two stages, same crops as Pillow, batched device-side ops."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("kornia", reason="the Kornia backend needs `pip install 'stoker[gpu]'` (kornia)")

from stoker.augment.kornia import HostBatch, KorniaTransform  # noqa: E402
from stoker.augment.pil import PilTransform  # noqa: E402
from stoker.augment.spec import IMAGENET_MEAN, IMAGENET_STD, TransformSpec  # noqa: E402
from test_augment_helpers import as_samples, jpeg, mixed_batch  # noqa: E402

SAMPLES = as_samples([jpeg(20 + i, 180 + 41 * i, 300 - 17 * i) for i in range(6)])


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_output_follows_the_collate_contract_on_cpu():
    batch = KorniaTransform(TransformSpec(), device="cpu")(SAMPLES)
    assert batch["image"].shape == (6, 3, 224, 224) and batch["image"].dtype == torch.uint8
    assert batch["image"].device.type == "cpu"
    assert batch["label"].tolist() == list(range(6)) and batch["skipped"] == 0


def test_decode_stage_ships_only_the_crop_regions_as_uint8():
    transform = KorniaTransform(TransformSpec(size=64), device="cpu")
    staged = transform.decode(SAMPLES)
    host = staged["image"]
    assert isinstance(host, HostBatch) and host.pixels.dtype == torch.uint8
    assert host.pixels.shape[0] == 6 and host.boxes.shape == (6, 4) and host.flips.shape == (6,)
    # Crops are reduced towards 64 px, so the padded batch is far smaller than the 180..385 px sources.
    assert host.pixels.shape[1] < 180 and host.pixels.shape[2] < 180
    assert torch.equal(transform.augment(staged)["image"], transform(SAMPLES)["image"])
    # What a DataLoader worker sends back to the main process must survive pickling.
    clone = pickle.loads(pickle.dumps(staged))
    assert torch.equal(transform.augment(clone)["image"], transform(SAMPLES)["image"])


@pytest.mark.parametrize(
    "spec, tolerance",
    [
        (TransformSpec(mode="eval"), 2.0),
        (TransformSpec(mode="eval", flip_prob=1.0), 2.0),
        (TransformSpec(), 2.0),
        (TransformSpec(size=(96, 128), mode="eval"), 2.0),
        (TransformSpec(brightness=0.4, contrast=0.4, saturation=0.4), 3.0),
    ],
)
def test_agrees_with_the_pillow_backend(spec, tolerance):
    # Same crops and flips; Kornia resamples bilinearly without antialiasing (docs/augment.md: tolerances).
    ours = KorniaTransform(spec, device="cpu", seed=1)(SAMPLES)["image"]
    reference = PilTransform(spec, seed=1)(SAMPLES)["image"]
    assert _mean_abs_diff(ours, reference) < tolerance


def test_every_input_kind_decodes():
    spec = TransformSpec(size=96, mode="eval")
    samples = as_samples(mixed_batch())
    ours = KorniaTransform(spec, device="cpu")(samples)["image"]
    assert ours.shape == (11, 3, 96, 96)
    assert _mean_abs_diff(ours, PilTransform(spec)(samples)["image"]) < 2.0


def test_float_normalized_hwc_output():
    spec = TransformSpec(dtype="float32", mean=IMAGENET_MEAN, std=IMAGENET_STD, layout="HWC")
    ours = KorniaTransform(spec, device="cpu")(SAMPLES)["image"]
    reference = PilTransform(spec)(SAMPLES)["image"]
    assert ours.shape == (6, 224, 224, 3) and ours.dtype == torch.float32
    assert (ours - reference).abs().mean().item() < 2.0 / 255 / min(IMAGENET_STD)


def test_skip_policy_and_empty_batches():
    transform = KorniaTransform(TransformSpec(on_error="skip"), device="cpu")
    batch = transform([SAMPLES[0], dict(SAMPLES[1], image=SAMPLES[1]["image"][:-2000]), SAMPLES[2]])
    assert batch["image"].shape[0] == 2 and batch["skipped"] == 1 and batch["key"] == ["img-000", "img-002"]
    empty = transform([dict(SAMPLES[0], image=b"junk")])
    assert empty["image"].shape == (0, 3, 224, 224) and transform.skipped == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_uses_pinned_staging():
    spec = TransformSpec(brightness=0.2, contrast=0.2, saturation=0.2)
    gpu = KorniaTransform(spec, device="cuda:0")
    staged = gpu.decode(SAMPLES)
    assert staged["image"].pixels.is_pinned()
    out = gpu.augment(staged)["image"]
    assert out.device.type == "cuda"
    assert _mean_abs_diff(out.cpu(), KorniaTransform(spec, device="cpu")(SAMPLES)["image"]) < 0.05
