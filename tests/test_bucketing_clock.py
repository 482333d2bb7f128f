"""Stage clocks of a BucketedStream through stoker.DataLoader, in real worker processes, and the monitor's verdict on
such a text loader.

Each worker sends the stage seconds it spent since its previous batch with the batch (the wrapped StreamingDataset's
reads and transform, the bucketing, the collate_fn); the loader adds them up. No timed assertions: the costly stage
sleeps a known time per sample or per batch, so its total has a floor and it comes out on top on any machine.
"""

from __future__ import annotations

import time

import pytest
import torch

import stoker
from stoker import DataLoader, StreamingDataset
from stoker.clock import STAGES
from stoker.perf.diagnosis import KEEPING_UP, STARVING
from stoker.synthetic import make_dataset

ROWS = (60, 60)  # 120 text samples
BATCH = 4  # samples per bucketed batch: 30 batches, enough steady steps for the monitor to judge
SLEEP = 0.02  # per batch in a costly collate_fn
SAMPLE_SLEEP = 0.01  # per sample in a costly transform


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("txt"), rows=ROWS, kind="text", fmt="msgpack")


def slow_transform(sample):
    time.sleep(SAMPLE_SLEEP)
    return sample


class SlowPad:
    """pad_collate that also sleeps per batch: a costly collate_fn (a class, so spawned workers can pickle it)."""

    def __init__(self) -> None:
        self.pad = stoker.pad_collate()

    def __call__(self, samples):
        time.sleep(SLEEP)
        return self.pad(samples)


PICKLE_SLEEP = 0.005  # per batch, pickling it in the worker
UNPICKLE_SLEEP = 0.02  # per batch, unpickling it in the training process


def _received(batch):
    time.sleep(UNPICKLE_SLEEP)
    return batch


class SlowToSend:
    """A batch that is slow to pickle (in the worker) and slower to unpickle (in the training process)."""

    def __init__(self, batch) -> None:
        self.batch = batch

    def __reduce__(self):
        time.sleep(PICKLE_SLEEP)
        return (_received, (self.batch,))


class SlowHandoffPad:
    """pad_collate whose batches are slow to cross processes (a class, so spawned workers can pickle it)."""

    def __init__(self) -> None:
        self.pad = stoker.pad_collate()

    def __call__(self, samples):
        return SlowToSend(self.pad(samples))


def loader(text, workers, *, transform=None, collate_fn=None, persistent=False):
    stream = stoker.BucketedStream(StreamingDataset(text, seed=0, transform=transform), batch_size=BATCH,
                                   buffer_size=32, seed=1)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=persistent,
                      collate_fn=stoker.pad_collate() if collate_fn is None else collate_fn)


def samples_in(batches):
    return sum(int(b["lengths"].numel()) for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_costly_transform_of_the_wrapped_dataset_comes_back_from_every_worker(text, workers):
    it = loader(text, workers, transform=slow_transform)
    assert it.stage_times() == {}  # nothing ran yet
    assert samples_in(list(it)) == sum(ROWS)
    times = it.stage_times()
    assert set(times) <= set(STAGES) and all(v > 0 for v in times.values())
    # Every sample slept in the transform, in whichever worker read it: all of it is counted, not one worker's share.
    assert times["transform"] >= sum(ROWS) * SAMPLE_SLEEP
    assert max(times, key=times.get) == "transform"
    # The wrapped dataset's reads and the stream's bucketing ("collate") are their own stages.
    assert {"read", "collate"} <= set(times)
    assert ("handoff" in times) == ("receive" in times) == (workers > 0)  # crossed processes only with workers


@pytest.mark.parametrize("workers", [0, 2])
def test_a_costly_collate_fn_is_the_largest_stage(text, workers):
    it = loader(text, workers, collate_fn=SlowPad())
    batches = list(it)
    assert samples_in(batches) == sum(ROWS)
    times = it.stage_times()
    # The loader's collate_fn is the user's part, "transform" (as on StreamingDataset's own path).
    assert times["transform"] >= len(batches) * SLEEP and max(times, key=times.get) == "transform"
    assert times["read"] > 0 and times["collate"] > 0


def test_without_a_collate_fn_torchs_conversion_counts_as_collate(text):
    stream = stoker.BucketedStream(StreamingDataset(text, seed=0), batch_size=BATCH, buffer_size=32, seed=1)
    it = DataLoader(stream, batch_size=None, num_workers=2)
    assert sum(len(b) for b in it) == sum(ROWS)
    times = it.stage_times()
    assert {"read", "collate", "handoff"} <= set(times) and "transform" not in times


def test_stage_times_only_grow_over_epochs_and_a_resumed_pass(text):
    it = loader(text, 2, persistent=True)
    list(it)
    first = it.stage_times()
    list(it)  # the second epoch, on the same persistent workers
    second = it.stage_times()
    assert all(second[k] > first[k] for k in ("read", "collate", "transform", "handoff"))
    # A pass resumed from a checkpoint times its own batches: the rest of the epoch, on new workers.
    head = iter(it)
    for _ in range(5):
        next(head)
    state = it.state_dict()
    resumed = loader(text, 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest and {"read", "collate", "transform", "handoff"} <= set(resumed.stage_times())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pinned_batches_count_pinning_in_the_training_process(text):
    it = DataLoader(stoker.BucketedStream(StreamingDataset(text, seed=0), batch_size=BATCH, buffer_size=32, seed=1),
                    batch_size=None, num_workers=2, collate_fn=stoker.pad_collate(), pin_memory=True)
    batches = list(it)
    assert samples_in(batches) == sum(ROWS) and all(b["input_ids"].is_pinned() for b in batches)
    assert {"pin", "handoff", "receive", "read", "collate", "transform"} <= set(it.stage_times())


def watch(it, step_s):
    lines: list[str] = []
    with stoker.monitor(it, log=lines.append, log_every=0) as m:
        for _ in m:
            time.sleep(step_s)  # the training step
    return m.last_report, "\n".join(lines)


def test_the_monitor_names_a_costly_collate_fn_of_a_bucketed_text_loader(text):
    report, lines = watch(loader(text, 2, collate_fn=SlowPad()), 0.001)
    assert report["state"] == STARVING and report["bottleneck_stage"] == "transform", lines
    assert "the transform / collate_fn (CPU, 2 workers)" in report["headline"]
    assert report["local"]["stage_seconds"]["transform"] > 0
    # Advice for this run: its collate_fn (no per-sample transform), text shards (nothing about images).
    advice = " ".join(report["advice"])
    assert "Your collate_fn is the slow part" in advice, advice
    assert "image" not in advice and "once per sample" not in advice and "stage times" not in advice


def test_the_monitor_names_a_costly_transform_under_a_bucketed_stream(text):
    report, lines = watch(loader(text, 2, transform=slow_transform), 0.001)
    assert report["state"] == STARVING and report["bottleneck_stage"] == "transform", lines
    assert "the transform / collate_fn (CPU, 2 workers)" in report["headline"]
    advice = " ".join(report["advice"])
    assert "Your transform runs once per sample in Python" in advice, advice
    assert "image" not in advice and "build_transform" not in advice


@pytest.mark.parametrize("sample_transform, expected", [
    (False, ["Your collate_fn is the slow part"]),
    (True, ["Your transform runs once per sample in Python: do the work per batch (one tensor op on the stacked "
            "batch)."]),
])
def test_transform_advice_for_text_on_a_gpu_machine_names_no_image_backend(sample_transform, expected):
    from stoker.perf.diagnosis import RunFacts, advice

    facts = RunFacts(num_workers=2, usable_cores=2, cuda=True, has_stage_times=True, images=False,
                     sample_transform=sample_transform)
    lines = advice("transform", facts)
    assert len(lines) == 1 and lines[0].startswith(expected[0]), lines  # no DALI, kornia, --max-side
    # Image shards keep the image advice.
    image_lines = " ".join(advice("transform", RunFacts(num_workers=2, usable_cores=2, cuda=True, images=True)))
    assert "--max-side" in image_lines and "backend='dali'" in image_lines and "build_transform" in image_lines


def test_the_monitor_keeps_a_fast_bucketed_text_loader_apart_from_a_slow_step(text):
    # Taking one batch in costs the training process a millisecond or two on a busy machine (one message per batch,
    # its tensors' shared memory mapped): a 100 ms step keeps that well under the 5% threshold.
    report, lines = watch(loader(text, 2), 0.1)
    assert report["state"] == KEEPING_UP and report["bottleneck_stage"] is None, lines
    assert report["local"]["stage_seconds"]  # the clocks came back from the workers; still no stage is blamed


def test_unpickling_in_the_training_process_is_its_own_stage_not_shared_by_the_workers(text):
    from stoker.perf.diagnosis import stage_costs

    it = loader(text, 2, collate_fn=SlowHandoffPad())
    batches = list(it)
    assert samples_in(batches) == sum(ROWS)
    times = it.stage_times()
    # Pickling ran in the workers ("handoff"), unpickling in this process ("receive"), every batch of each.
    assert times["handoff"] >= len(batches) * PICKLE_SLEEP and times["receive"] >= len(batches) * UNPICKLE_SLEEP
    # The training process unpickles one batch after another: its cost per batch is not divided by the 2 workers.
    assert stage_costs(times, len(batches), 2)["receive"] >= UNPICKLE_SLEEP
    report, lines = watch(loader(text, 2, collate_fn=SlowHandoffPad()), 0.001)
    assert report["state"] == STARVING and report["bottleneck_stage"] == "receive", lines
    assert "taking batches in (unpickling in the training process)" in report["headline"]
    assert "num_workers" not in " ".join(report["advice"])  # more workers do not unpickle faster


@pytest.mark.parametrize("persistent, starts", [(False, 2), (True, 1)])
def test_worker_starts_count_each_set_of_workers_started(text, persistent, starts):
    it = loader(text, 2, persistent=persistent)
    assert it.worker_starts == 0
    for _ in range(2):  # two epochs: new workers for each without persistent ones
        assert samples_in(list(it)) == sum(ROWS)
    assert it.worker_starts == starts and it.workers_first_batch == 0
    head = iter(it)
    next(head)
    third = it.worker_starts
    assert third == starts + (not persistent)
    # A pass resumed from a checkpoint runs on workers that take the checkpoint along: new ones, persistent or not.
    state = it.state_dict()
    del head
    it.load_state_dict(state)
    list(it)
    assert it.worker_starts == third + 1


def test_a_loader_without_workers_starts_none(text):
    it = loader(text, 0)
    assert samples_in(list(it)) == sum(ROWS) and it.worker_starts == 0


def test_the_monitor_reports_a_new_pass_without_persistent_workers_as_a_restart(text):
    it = loader(text, 2)
    lines: list[str] = []
    with stoker.monitor(it, log=lines.append, log_every=0) as m:
        for _ in range(2):
            for _batch in m:
                pass
    restarts = m.last_report["local"]["restarts"]
    assert it.worker_starts == 2 and restarts["count"] == 1 and restarts["steps"] == 2, "\n".join(lines)


def test_the_package_exports_the_stream_beside_the_samplers_and_collates():
    from stoker.bucketing.bucketed import BucketedStream

    assert stoker.BucketedStream is BucketedStream and "BucketedStream" in stoker.__all__


def test_the_monitors_advice_reads_the_wrapped_datasets_settings(text, tmp_path):
    from stoker.perf.loader_facts import run_facts

    # Advice on fetch and read rests on the shards' settings ("raise parallel_reads (now 8)", "give it a cache_dir"):
    # under a BucketedStream they are its wrapped StreamingDataset's, not missing.
    read = stoker.ReadOptions(parallel_reads=3, prefetch_shards=5)
    inner = StreamingDataset(text, seed=0, read=read, cache_dir=str(tmp_path))
    facts = run_facts(DataLoader(stoker.BucketedStream(inner, batch_size=BATCH), batch_size=None, num_workers=2))
    assert (facts.parallel_reads, facts.prefetch_shards, facts.cache_dir) == (3, 5, str(tmp_path))
    assert facts.shard_bytes is not None and facts.num_workers == 2 and facts.has_stage_times
