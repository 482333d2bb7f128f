"""stoker.monitor on stoker.DataLoader with real parts: real JPEGs through stoker's Pillow transform, a costly
collate of large samples, a slow training step, a fast everything, and two real gloo ranks of which one is slow.

Each case asserts the verdict and the stage the report names, never a time: the slow part is made several times
slower than everything else, so a busy machine cannot reorder the stages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import stoker
from stoker.synthetic import make_dataset
from _distributed import run_gloo_ranks
from stoker.formats.pack import pack_dataset
from stoker.perf.diagnosis import KEEPING_UP, STARVING

STEPS_AT_LEAST = 20  # more than start-up plus the steady steps the verdict needs


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("monitor-rows"), rows=(200, 200))


def watch(loader, step_s: float, lines: list[str]) -> dict:
    with stoker.monitor(loader, log=lines.append, log_every=0) as m:
        for _ in m:
            time.sleep(step_s)  # the training step
    return m.last_report


def big_sample(sample: dict) -> dict:
    """A cheap transform whose output is large (4 MB of float32): collating 16 of them dominates the loader."""
    return {"x": torch.empty(1 << 20), "label": sample["label"]}


def test_costly_decode_and_augment_names_the_transform(large_jpegs) -> None:
    transform = stoker.build_transform(stoker.TransformSpec(size=224), backend="pil", seed=0)
    loader = stoker.DataLoader(stoker.StreamingDataset(large_jpegs, seed=0), batch_size=8, num_workers=2,
                               collate_fn=transform)
    lines: list[str] = []
    report = watch(loader, 0.001, lines)
    text = "\n".join(lines)
    assert report["local"]["steps"] >= STEPS_AT_LEAST
    assert report["state"] == STARVING and report["bottleneck_stage"] == "transform", text
    assert "decode and augment in stoker's transform (CPU, pil, 2 workers)" in report["headline"]
    assert any("--max-side" in line for line in report["advice"])
    assert "STARVING" in text and "transform" in text


def test_costly_collate_names_collate(rows) -> None:
    loader = stoker.DataLoader(stoker.StreamingDataset(rows, seed=0, transform=big_sample), batch_size=16,
                               num_workers=2)
    lines: list[str] = []
    report = watch(loader, 0.001, lines)
    assert report["state"] == STARVING and report["bottleneck_stage"] == "collate", "\n".join(lines)
    assert any("uint8 rather than float" in line for line in report["advice"])


def test_slow_training_step_is_not_starving(rows) -> None:
    loader = stoker.DataLoader(stoker.StreamingDataset(rows, seed=0), batch_size=16, num_workers=2)
    lines: list[str] = []
    report = watch(loader, 0.03, lines)
    assert report["state"] == KEEPING_UP and report["bottleneck"] == "compute", "\n".join(lines)
    assert report["advice"] == [] and report["bottleneck_stage"] is None
    # start-up is reported apart: the first batch of each worker, never part of the verdict
    assert report["ranks"][0]["startup_steps"] == 2


def test_fast_everything_is_not_starving(rows) -> None:
    # A fast loader (rows only, no transform) and a short step of real compute (~20 ms of matmuls on an idle core).
    # Each bundle of batches costs the loop ~1 ms to take in (measured: waits of 0.7-1.8 ms when a bundle of 1, 2, 4
    # or 8 batches arrives), so a step of ~6 ms waits ~5% of its time, right at the threshold, on any machine.
    weights = torch.randn(256, 256)
    loader = stoker.DataLoader(stoker.StreamingDataset(rows, seed=0), batch_size=16, num_workers=1)
    lines: list[str] = []
    with stoker.monitor(loader, log=lines.append, log_every=0) as m:
        for _ in m:
            x = torch.randn(64, 256)
            for _ in range(200):
                x = torch.tanh(x @ weights)
    report = m.last_report
    assert report["state"] == KEEPING_UP, "\n".join(lines)
    assert report["local"]["stage_seconds"]  # the loader's clocks were read, and still no stage is blamed
    assert report["bottleneck_stage"] is None


def test_waits_while_every_stage_keeps_ahead_are_the_hand_off_not_a_stage(rows) -> None:
    # A fast loader (rows only, 1 worker, far below a millisecond a batch) and a 20 ms step: with a threshold this
    # low the loop's small waits make it STARVING, and still no stage may be blamed for them, nor more workers.
    loader = stoker.DataLoader(stoker.StreamingDataset(rows, seed=0), batch_size=16, num_workers=1)
    lines: list[str] = []
    with stoker.monitor(loader, log=lines.append, log_every=5, starve_threshold=1e-6) as m:
        for _ in m:
            time.sleep(0.02)
    report, text = m.last_report, "\n".join(lines)
    assert report["state"] == STARVING and report["local"]["stage_seconds"], text
    assert report["bottleneck_stage"] is None, text
    assert "no loader stage is slower than the step" in report["headline"], text
    assert ("is not the workers' stage work: it goes to handing batches over to the training process (unpickling "
            "them: ") in report["headline"], text  # the training process's part, as measured
    assert not any("num_workers" in line or "NVMe" in line for line in report["advice"]), text
    assert "neither more workers nor faster stages" in " ".join(report["advice"])
    assert "STARVING:" not in text  # the periodic lines blame no stage either


def _rank_main(rank: int, out: str, jpegs: str) -> None:
    spec = stoker.TransformSpec(size=224 if rank == 1 else 32)
    transform = stoker.build_transform(spec, backend="pil", seed=0)
    # Rank 1 decodes and augments full-size JPEGs; rank 0 only reads its rows (no transform at all).
    loader = stoker.DataLoader(stoker.StreamingDataset(jpegs, seed=0), batch_size=8, num_workers=1,
                               collate_fn=transform if rank == 1 else _labels_only)
    lines: list[str] = []
    with stoker.monitor(loader, log=lines.append, log_every=0) as m:
        for _ in m:
            time.sleep(0.002)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"report": m.last_report, "lines": lines}, default=str))


def _labels_only(samples: list[dict]) -> dict:
    return {"label": torch.tensor([int(s["label"]) for s in samples])}


def test_two_gloo_ranks_name_the_slow_rank_and_its_stage(large_jpegs, tmp_path) -> None:
    run_gloo_ranks(_rank_main, 2, str(tmp_path), large_jpegs, timeout=120)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in reports:
        report = result["report"]
        assert report["slowest_rank"] == 1
        assert report["state"] == STARVING and report["bottleneck_stage"] == "transform"
        assert report["headline"].startswith("STARVING") and "on rank 1" in report["headline"]
        assert "stoker's transform (CPU, pil, 1 worker)" in report["headline"]  # rank 1's own facts
        assert [r["state"] for r in report["ranks"]][1] == STARVING
    assert "on rank 1" in "\n".join(reports[0]["lines"])


def test_slow_object_store_names_remote_reads(large_jpegs, object_store, tmp_path) -> None:
    # Shards of a few images each, so fetching goes on all run long rather than only during start-up; 100 ms
    # before every first byte and 1 MB/s per connection: fetching dwarfs everything else.
    small = str(tmp_path / "small")
    pack_dataset(str(Path(large_jpegs).parent / "raw"), small, format="arrow", shard_size=64 << 10, progress=False)
    store = object_store(small, latency=0.1, rate=1e6)
    # No shuffle: a shuffle window wider than this small dataset would fetch every shard during start-up.
    dataset = stoker.StreamingDataset(store.url("s3"), shuffle=False, storage_options=store.storage_options(),
                                      cache_dir=str(tmp_path / "cache"))
    loader = stoker.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=_labels_only)
    lines: list[str] = []
    report = watch(loader, 0.001, lines)
    text = "\n".join(lines)
    assert report["state"] == STARVING and report["bottleneck_stage"] == "fetch", text
    assert "remote reads (s3://" in report["headline"] and "1 read in flight per shard" in report["headline"]
    # ~64 kB shards are one ranged read each: more reads per shard cannot help, more shards ahead can
    assert any("ReadOptions.prefetch_shards (now 2)" in line for line in report["advice"])
    assert not any("parallel_reads" in line for line in report["advice"])
    assert not any("cache_dir" in line for line in report["advice"])  # it has one already


class Squares(torch.utils.data.Dataset):
    """A map-style dataset of the user's own, slow to index: torch's workers cannot send stage clocks for it."""

    def __len__(self) -> int:
        return 160

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.004)
        return torch.full((4,), float(i * i))


def test_users_own_dataset_gets_the_training_process_view() -> None:
    loader = stoker.DataLoader(Squares(), batch_size=8, num_workers=1)
    lines: list[str] = []
    report = watch(loader, 0.001, lines)
    assert report["state"] == STARVING and report["bottleneck_stage"] is None, "\n".join(lines)
    assert any("does not report per-stage times" in line for line in report["advice"])


def _slow_start(worker_id: int) -> None:
    time.sleep(0.3)  # a worker that takes its time to start: connections, caches, imports


def test_a_short_run_is_not_starving_because_of_start_up(rows) -> None:
    dataset = stoker.StreamingDataset(rows, seed=0)
    loader = stoker.DataLoader(dataset, batch_size=16, num_workers=2, worker_init_fn=_slow_start)
    lines: list[str] = []
    with stoker.monitor(loader, log=lines.append, log_every=0) as m:
        for step, _ in enumerate(m):
            time.sleep(0.06)  # long against a busy machine's hand-off of each batch: 5% of it is 3 ms
            if step == 19:  # tens of steps
                break
    report = m.last_report
    # Counting start-up (0.3 s against 1.2 s of steps), the loop waited a fifth of its time, far above the
    # threshold; the steady state did not.
    assert report["local"]["data_wait_fraction"] > report["local"]["starve_threshold"]
    assert report["state"] == KEEPING_UP, "\n".join(lines)
    assert report["ranks"][0]["startup_wait_s"] >= 0.3
    assert "not counted in the verdict" in "\n".join(lines)
