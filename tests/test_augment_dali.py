"""The DALI backend, run for real as a CPU pipeline (device_id=None); GPU cases are marked `gpu`."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="the DALI backend needs `pip install 'stoker[gpu]'` (nvidia-dali-cuda120)")

from stoker.augment.dali import DaliTransform  # noqa: E402
from stoker.augment.decode import DecodeError  # noqa: E402
from stoker.augment.pil import PilTransform  # noqa: E402
from stoker.augment.spec import IMAGENET_MEAN, IMAGENET_STD, TransformSpec  # noqa: E402
from test_augment_helpers import as_samples, encode, jpeg, mixed_batch, photo  # noqa: E402

SAMPLES = as_samples([jpeg(40 + i, 210 + 29 * i, 320 - 13 * i) for i in range(5)])


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_cpu_pipeline_decodes_every_input_kind_like_pillow():
    # Resize + center crop is deterministic: DALI and Pillow differ in rounding, and by about one grey
    # level where Pillow decodes a large JPEG at reduced (DCT-scaled) size (docs/augment.md: tolerances).
    spec = TransformSpec(size=96, mode="eval")
    samples = as_samples(mixed_batch())
    transform = DaliTransform(spec, device="cpu")
    out = transform(samples)
    assert out["image"].shape == (11, 3, 96, 96) and out["image"].dtype == torch.uint8
    assert out["label"].tolist() == list(range(11))
    reference = PilTransform(spec)(samples)["image"]
    per_sample = (out["image"].float() - reference.float()).abs().mean(dim=(1, 2, 3))
    assert per_sample.max().item() < 1.5, per_sample.tolist()


@pytest.mark.parametrize(
    "spec, tolerance",
    [
        (TransformSpec(mode="eval", flip_prob=1.0), 0.5),
        (TransformSpec(), 0.5),
        (TransformSpec(brightness=0.4, contrast=0.4, saturation=0.4), 2.0),
    ],
)
def test_cpu_pipeline_agrees_with_pillow(spec, tolerance):
    ours = DaliTransform(spec, device="cpu", seed=2)(SAMPLES)["image"]
    assert _mean_abs_diff(ours, PilTransform(spec, seed=2)(SAMPLES)["image"]) < tolerance


def test_float_normalized_hwc_output():
    spec = TransformSpec(dtype="float32", mean=IMAGENET_MEAN, std=IMAGENET_STD, layout="HWC")
    ours = DaliTransform(spec, device="cpu")(SAMPLES)["image"]
    assert ours.shape == (5, 224, 224, 3) and ours.dtype == torch.float32
    assert (ours - PilTransform(spec)(SAMPLES)["image"]).abs().mean().item() < 0.5 / 255 / min(IMAGENET_STD)


def test_pipeline_is_reused_and_grows_for_bigger_batches():
    transform = DaliTransform(TransformSpec(size=64), device="cpu", num_threads=2)
    small = transform(SAMPLES[:2])["image"]
    pipe = transform._pipe
    assert transform(SAMPLES[2:4])["image"].shape[0] == 2 and transform._pipe is pipe
    everything = transform(SAMPLES)["image"]
    assert everything.shape[0] == 5 and transform._pipe is not pipe
    assert torch.equal(everything[:2], small)


def test_truncated_image_raises_decode_error_naming_the_sample():
    # The header parses, so only the decoder itself finds the damage; DALI fails the whole batch and
    # the transform pins it on the right sample.
    samples = [SAMPLES[0], dict(SAMPLES[1], image=SAMPLES[1]["image"][:-4000]), SAMPLES[2]]
    with pytest.raises(DecodeError, match="shard-000: sample img-001"):
        DaliTransform(TransformSpec(), device="cpu")(samples)


def test_skip_policy_reruns_the_good_samples():
    transform = DaliTransform(TransformSpec(on_error="skip"), device="cpu")
    broken = dict(SAMPLES[1], image=SAMPLES[1]["image"][:-4000])
    batch = transform([SAMPLES[0], broken, SAMPLES[2], dict(SAMPLES[3], image=b"junk")])
    assert batch["key"] == ["img-000", "img-002"] and batch["skipped"] == 2 and transform.skipped == 2
    assert torch.equal(batch["image"], transform([SAMPLES[0], SAMPLES[2]])["image"])


def test_pickles_without_its_pipeline_and_rebuilds_it():
    transform = DaliTransform(TransformSpec(size=64), device="cpu", seed=9)
    expected = transform(SAMPLES)["image"]
    clone = pickle.loads(pickle.dumps(transform))
    assert clone._pipe is None and torch.equal(clone(SAMPLES)["image"], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_gpu_pipeline_matches_cpu_pipeline():
    spec = TransformSpec(brightness=0.2, contrast=0.2, saturation=0.2)
    gpu = DaliTransform(spec, device="cuda:0")(SAMPLES)["image"]
    assert gpu.device.type == "cuda" and gpu.shape == (5, 3, 224, 224)
    # nvJPEG and libjpeg-turbo differ slightly in chroma upsampling and IDCT.
    assert _mean_abs_diff(gpu.cpu(), DaliTransform(spec, device="cpu")(SAMPLES)["image"]) < 2.0


def test_images_only_pillow_reads_are_reported_per_sample():
    # GIF decodes in Pillow but not in DALI: the failure must still land on the right sample.
    gif = encode(photo(5, 40, 50), "GIF")
    transform = DaliTransform(TransformSpec(size=32, on_error="skip"), device="cpu")
    batch = transform([SAMPLES[0], dict(SAMPLES[1], image=gif), SAMPLES[2]])
    assert batch["key"] == ["img-000", "img-002"] and batch["skipped"] == 1
    with pytest.raises(DecodeError, match="img-001: .*DALI cannot decode this GIF image"):
        DaliTransform(TransformSpec(size=32), device="cpu")([SAMPLES[0], dict(SAMPLES[1], image=gif)])
