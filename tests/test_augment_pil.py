"""The Pillow backend: the collate contract, determinism, equality with plain Pillow, error policy."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stoker.augment import pil as pil_module
from stoker.augment.base import Planned
from stoker.augment.decode import DecodeError, decode_full, probe
from stoker.augment.params import sample_params, sample_rng
from stoker.augment.pil import PilTransform
from stoker.augment.spec import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from stoker.errors import ShardError
from test_augment_helpers import as_samples, jpeg, mixed_batch

SAMPLES = as_samples([jpeg(i, 200 + 37 * i, 260 + 23 * (i % 3)) for i in range(6)])


def _plain_pillow(sample: dict, spec: TransformSpec, seed: int = 0) -> np.ndarray:
    """What the transform must produce, written with nothing but Pillow and the shared parameters."""
    image, header = probe(sample["image"], spec.max_pixels)
    params = sample_params(spec, sample_rng(seed, 0, sample), header.width, header.height)
    out = image.convert("RGB").resize((spec.width, spec.height), Image.Resampling.BILINEAR, box=params.box)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out).transpose(2, 0, 1)


def test_output_follows_the_collate_contract():
    batch = PilTransform(TransformSpec())(SAMPLES)
    assert batch["image"].shape == (6, 3, 224, 224) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == list(range(6))
    assert batch["key"] == [s["key"] for s in SAMPLES] and batch["skipped"] == 0


def test_every_input_kind_decodes_in_one_batch():
    batch = PilTransform(TransformSpec(size=96, mode="eval"))(as_samples(mixed_batch()))
    assert batch["image"].shape == (11, 3, 96, 96)
    one_pixel = torch.from_numpy(np.array(decode_full(mixed_batch()[-1], 10**8))).view(3, 1, 1)
    assert torch.equal(batch["image"][-1], one_pixel.expand(3, 96, 96))  # the 1x1 image, upscaled


def test_eval_output_equals_pillow_resize_then_center_crop():
    spec = TransformSpec(mode="eval")
    batch = PilTransform(spec)(SAMPLES)["image"].numpy()
    for row, sample in zip(batch, SAMPLES):
        assert np.abs(row.astype(np.int16) - _plain_pillow(sample, spec)).max() <= 1


def test_train_output_matches_pillow_with_the_same_crops_and_flips():
    # Whole-pixel crops go through PyTorch's antialiased uint8 resize; it tracks Pillow to rounding.
    spec = TransformSpec()
    batch = PilTransform(spec)(SAMPLES)["image"].numpy().astype(np.int16)
    reference = np.stack([_plain_pillow(s, spec) for s in SAMPLES])
    assert np.abs(batch - reference).mean() < 0.1
    assert np.abs(batch - reference).max() <= 12


def test_pillow_resampling_path_equals_pillow_exactly(monkeypatch):
    monkeypatch.setattr(pil_module, "_pillow_is_simd", lambda: True)  # as if Pillow-SIMD were installed
    spec = TransformSpec()
    batch = PilTransform(spec)(SAMPLES)["image"].numpy()
    np.testing.assert_array_equal(batch, np.stack([_plain_pillow(s, spec) for s in SAMPLES]))


def test_float_normalized_hwc_output_is_the_uint8_output_rescaled():
    uint8 = PilTransform(TransformSpec(layout="HWC"))(SAMPLES)["image"]
    spec = TransformSpec(layout="HWC", dtype="float32", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    normalized = PilTransform(spec)(SAMPLES)["image"]
    assert normalized.shape == (6, 224, 224, 3) and normalized.dtype == torch.float32
    expected = (uint8.float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normalized, expected, atol=1e-6)


def test_jitter_changes_colours_within_the_requested_strength():
    plain = PilTransform(TransformSpec(mode="eval"))(SAMPLES)["image"].float()
    jittered = PilTransform(TransformSpec(mode="eval", brightness=0.3))(SAMPLES)["image"].float()
    ratio = jittered.mean(dim=(1, 2, 3)) / plain.mean(dim=(1, 2, 3))
    assert ((ratio > 0.65) & (ratio < 1.35)).all() and (ratio - 1).abs().max() > 0.01


def test_same_seed_same_batch_and_independent_of_batching_and_threads():
    spec = TransformSpec(brightness=0.2, contrast=0.2, saturation=0.2)
    whole = PilTransform(spec, seed=3)(SAMPLES)["image"]
    assert torch.equal(PilTransform(spec, seed=3)(SAMPLES)["image"], whole)
    singles = torch.cat([PilTransform(spec, seed=3)([s])["image"] for s in reversed(SAMPLES)]).flip(0)
    assert torch.equal(singles, whole)
    threaded = PilTransform(spec, seed=3, num_threads=3)(SAMPLES)["image"]
    assert torch.equal(threaded, whole)
    assert not torch.equal(PilTransform(spec, seed=4)(SAMPLES)["image"], whole)


def test_set_epoch_draws_new_crops():
    transform = PilTransform(TransformSpec(), seed=0)
    first = transform(SAMPLES)["image"]
    transform.set_epoch(1)
    second = transform(SAMPLES)["image"]
    transform.set_epoch(0)
    assert not torch.equal(first, second) and torch.equal(transform(SAMPLES)["image"], first)


def test_bad_bytes_raise_a_decode_error_naming_key_and_shard():
    samples = SAMPLES[:2] + [{"image": b"\xff\xd8 not really a jpeg", "label": 9, "key": "broken", "shard": "s-07"}]
    with pytest.raises(DecodeError, match="s-07: sample broken: cannot decode image") as info:
        PilTransform(TransformSpec())(samples)
    assert isinstance(info.value, ShardError) and info.value.key == "broken"


def test_truncated_jpeg_raises_during_decode():
    truncated = dict(SAMPLES[1], image=SAMPLES[1]["image"][:-3000])
    with pytest.raises(DecodeError, match="img-001"):
        PilTransform(TransformSpec())([SAMPLES[0], truncated])


def test_skip_policy_drops_bad_samples_and_counts_them():
    bad = [dict(SAMPLES[1], image=b"garbage"), dict(SAMPLES[3], image=SAMPLES[3]["image"][:-3000])]
    samples = [SAMPLES[0], bad[0], SAMPLES[2], bad[1]]
    transform = PilTransform(TransformSpec(on_error="skip"))
    batch = transform(samples)
    assert batch["image"].shape[0] == 2 and batch["skipped"] == 2 and transform.skipped == 2
    assert batch["label"].tolist() == [0, 2] and batch["key"] == ["img-000", "img-002"]
    assert torch.equal(batch["image"], transform([SAMPLES[0], SAMPLES[2]])["image"])
    empty = transform(bad)
    assert empty["image"].shape == (0, 3, 224, 224) and empty["label"].shape == (0,) and transform.skipped == 4


def test_max_pixels_guard_names_the_sample():
    with pytest.raises(DecodeError, match="img-000.*max_pixels"):
        PilTransform(TransformSpec(max_pixels=50_000))(SAMPLES[:1])


def test_malformed_samples_are_a_type_error():
    with pytest.raises(TypeError, match="'image'"):
        PilTransform(TransformSpec())([{"label": 1}])
    with pytest.raises(TypeError, match="encoded bytes"):
        PilTransform(TransformSpec())([{"image": np.zeros(3), "label": 1}])


def test_pickled_transform_rebuilds_its_thread_pool():
    transform = PilTransform(TransformSpec(), num_threads=2)
    expected = transform(SAMPLES)["image"]  # creates the pool, which cannot be pickled
    clone = pickle.loads(pickle.dumps(transform))
    assert torch.equal(clone(SAMPLES)["image"], expected)


@pytest.mark.slow
def test_runs_as_collate_fn_in_spawned_dataloader_workers():
    transform = PilTransform(TransformSpec(size=64), seed=5)
    batches = [SAMPLES[:3], SAMPLES[3:]]
    loader = DataLoader(batches, batch_size=None, collate_fn=transform, num_workers=1, multiprocessing_context="spawn")
    out = list(loader)
    assert [b["label"].tolist() for b in out] == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(torch.cat([b["image"] for b in out]), transform(SAMPLES)["image"])


def test_render_returns_chw_uint8():
    spec = TransformSpec(size=(32, 48), mode="eval", flip_prob=1.0)
    image, header = probe(SAMPLES[0]["image"], spec.max_pixels)
    params = sample_params(spec, sample_rng(0, 0, SAMPLES[0]), header.width, header.height)
    pixels = pil_module.render(Planned(SAMPLES[0], image, header, params), (48, 32))
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.uint8


def _shared_in_worker(transform: PilTransform, samples: list[dict]) -> tuple[bool, torch.Tensor]:
    return transform(samples)["image"].is_shared(), transform(samples)["image"]


def test_a_worker_builds_its_batch_in_shared_memory():
    # Sent to the training process as a file descriptor: no copy of the pixels into shared memory on the way.
    transform = PilTransform(TransformSpec(size=64), seed=5)
    assert not transform(SAMPLES)["image"].is_shared()  # outside a worker: plain memory
    loader = DataLoader([SAMPLES], batch_size=None, num_workers=1,
                        collate_fn=functools.partial(_shared_in_worker, transform))
    (shared, image), = list(loader)
    assert shared and torch.equal(image, transform(SAMPLES)["image"])
