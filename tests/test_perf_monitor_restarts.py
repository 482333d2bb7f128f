"""Worker restarts are start-up: a re-deal of num_workers="auto" mid-pass and each new pass of a loader without
persistent workers start workers again, and the waits of the batches right after are reported apart as restarts.

Real worker processes; a worker_init_fn that sleeps stands for a costly worker start (opening connections, loading
a tokenizer), so the only long waits of these loops are at worker starts."""

from __future__ import annotations

import time

import pytest

from stoker.synthetic import make_dataset
from stoker import DataLoader, StreamingDataset, monitor
from stoker.dataloader.autotune import AutotuneConfig
from stoker.perf import diagnosis

WORKER_START_S = 0.5


def slow_start(_worker_id: int) -> None:
    time.sleep(WORKER_START_S)


def keys(samples: list[dict]) -> list[str]:
    return [s["key"] for s in samples]


def run(loader, step_s: float, epochs: int = 1, limit: int | None = None) -> dict:
    lines: list[str] = []
    with monitor(loader, log=lines.append, log_every=0) as batches:
        for _ in range(epochs):
            for n, _batch in enumerate(batches, 1):
                time.sleep(step_s)
                if limit is not None and n >= limit:
                    break
    report = batches.last_report
    report["text"] = "\n".join(lines)
    return report


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("restarts"), rows=(400, 400, 400, 400))


def slower_start(_worker_id: int) -> None:
    time.sleep(2 * WORKER_START_S)


def test_a_redeal_of_auto_workers_is_start_up_not_starvation(shards):
    # Batches cost 2 ms in a worker, the step 20 ms: four workers are far more than needed, so the tuner re-deals
    # to fewer, and the new workers' slow start is the only long wait after the first batches.
    ds = StreamingDataset(shards, seed=5, shuffle_buffer=200)
    loader = DataLoader(ds, batch_size=8, num_workers="auto", prefetch_factor="auto", collate_fn=keys,
                        worker_init_fn=slower_start, autotune_config=AutotuneConfig(start_workers=4, max_workers=6))
    report = run(loader, step_s=0.02, limit=150)
    assert loader.tuning_report().history, "the tuner did not re-deal: nothing to check"
    assert report["state"] == diagnosis.KEEPING_UP, report["text"]
    local = report["local"]
    restarts = local["restarts"]
    assert restarts["count"] == loader.worker_starts - 1 >= 1
    # The steps charged to the restart span the new workers' start (batches received before it hide part of it,
    # the rest is waited for); they are part of start-up, which also holds the first start's steps and wait.
    assert restarts["wait_s"] + restarts["compute_s"] >= 2 * WORKER_START_S * 0.9
    assert restarts["wait_s"] >= 0.1
    # Start-up holds the 4 first workers' first batches and the restart's. The first decision comes after the first
    # step, so the restart's steps can overlap the first start's (old workers' batches delivered after the re-deal
    # are charged to the restart), but never the first step.
    assert max(4, restarts["steps"] + 1) <= local["startup"]["steps"] <= 4 + restarts["steps"]
    assert local["steady"]["steps"] == local["steps"] - local["startup"]["steps"] >= diagnosis.MIN_STEADY_STEPS
    assert local["startup"]["wait_s"] >= restarts["wait_s"] + 2 * WORKER_START_S * 0.8  # the first start too
    assert "worker restart" in report["text"] and "not counted in the verdict" in report["text"]


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_started_again_each_pass_are_restarts(tmp_path, persistent):
    ds = StreamingDataset(make_dataset(tmp_path, rows=(40, 40)), seed=1)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=keys, worker_init_fn=slow_start,
                        persistent_workers=persistent)
    report = run(loader, step_s=0.01, epochs=3)
    local = report["local"]
    assert local["steps"] == 30 and local["startup"]["steps"] == 6  # each worker's first batch, each pass
    assert report["state"] == diagnosis.KEEPING_UP, report["text"]
    restarts = local["restarts"]
    if persistent:  # the same workers serve every pass: epoch boundaries, but no restart
        assert loader.worker_starts == 1 and restarts["count"] == 0 and restarts["steps"] == 0
        assert "  restarts " not in report["text"]
    else:
        assert loader.worker_starts == 3 and restarts["count"] == 2 and restarts["steps"] == 4
        assert restarts["wait_s"] >= 2 * WORKER_START_S * 0.8
        assert "2 worker restarts" in report["text"]
