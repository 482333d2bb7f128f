"""The monitor's verdict as pure functions: start-up apart, short runs not judged, the stage and advice named."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from stoker.perf.diagnosis import (
    KEEPING_UP,
    STARVING,
    TOO_SHORT,
    Phase,
    RunFacts,
    advice,
    blamed_stage,
    describe,
    diagnose,
    slowest_stage,
    stage_costs,
    startup_steps,
    state,
)


@pytest.mark.parametrize(
    ("steady", "expected"),
    [
        (Phase(100, 0.5, 9.5), KEEPING_UP),  # 5.0% is not above 5%
        (Phase(100, 0.6, 9.4), STARVING),
        (Phase(9, 9.0, 1.0), TOO_SHORT),  # 90% waiting, but 9 steps are not a steady state
        (Phase(10, 9.0, 1.0), STARVING),
        (Phase(0, 0.0, 0.0), TOO_SHORT),
        (Phase(50, 0.0, 0.0), TOO_SHORT),  # no time at all: no fraction to judge
    ],
)
def test_state_comes_from_the_steady_state_alone(steady, expected) -> None:
    assert state(steady, 0.05) == expected


def test_the_reported_short_run_is_not_starving_because_of_its_first_batch() -> None:
    # 15 steps of 50 ms; the first batch waited 50 ms, the others ~0.5 ms: 7.6% overall, ~1% steady
    steady, startup = Phase(14, 14 * 0.0005, 14 * 0.05), Phase(1, 0.05, 0.05)
    overall = (steady.wait_s + startup.wait_s) / (steady.wait_s + startup.wait_s + steady.compute_s + 0.05)
    assert overall > 0.05
    verdict = diagnose(steady, startup, None, RunFacts(), 0.05)
    assert verdict.state == KEEPING_UP and verdict.advice == ()


@pytest.mark.parametrize(("workers", "expected"), [(None, 1), (0, 1), (1, 1), (4, 4)])
def test_startup_is_one_batch_per_worker(workers, expected) -> None:
    assert startup_steps(workers) == expected


@pytest.mark.parametrize(
    ("times", "batches", "workers", "expected"),
    [
        # 4 workers share decode; pin runs in the training process, so it costs its whole time per batch
        ({"decode": 4.0, "pin": 1.5}, 100, 4, {"decode": 0.01, "pin": 0.015}),
        ({"decode": 4.0, "pin": 1.5}, 100, 0, {"decode": 0.04, "pin": 0.015}),
        ({"read": 1.0, "collate": 0.0}, 10, 2, {"read": 0.05}),  # a stage that never ran is left out
        ({"read": 1.0}, 0, 2, {}),
        # handing over: each worker pickles its own batches, the training process unpickles them one by one
        ({"handoff": 0.4, "receive": 0.3}, 100, 4, {"handoff": 0.001, "receive": 0.003}),
    ],
)
def test_stage_costs_per_batch(times, batches, workers, expected) -> None:
    costs = stage_costs(times, batches, workers)
    assert costs == pytest.approx(expected)


@pytest.mark.parametrize(
    ("costs", "expected"),
    [({"decode": 0.01, "pin": 0.015}, "pin"), ({"fetch": 0.2, "decode": 0.01}, "fetch"), ({}, None)],
)
def test_slowest_stage(costs, expected) -> None:
    assert slowest_stage(costs) == expected


CPU = RunFacts(num_workers=2, usable_cores=8, cuda=False, has_stage_times=True, backend="pil")
FULL = RunFacts(num_workers=8, usable_cores=8, cuda=False, has_stage_times=True, backend="pil")
GPU = RunFacts(num_workers=8, usable_cores=8, cuda=True, has_stage_times=True, backend="pil")
REMOTE = RunFacts(num_workers=8, usable_cores=8, has_stage_times=True, remote=True, source="s3://bucket/data",
                  parallel_reads=8, prefetch_shards=2, part_size=16 << 20, shard_bytes=256e6, cache_dir=None)
SMALL_SHARDS = RunFacts(num_workers=8, usable_cores=8, has_stage_times=True, remote=True, source="s3://b/d",
                        parallel_reads=8, prefetch_shards=2, part_size=16 << 20, shard_bytes=1e6, cache_dir="/c")
DALI = RunFacts(num_workers=8, usable_cores=8, cuda=True, has_stage_times=True, backend="dali")
PLAIN = RunFacts(num_workers=0, usable_cores=4)
GENERATOR = RunFacts(num_workers=None, usable_cores=4)


@pytest.mark.parametrize(
    ("stage", "facts", "present", "absent"),
    [
        ("decode", CPU, ["--max-side", "Raise num_workers (2 now, 8 usable cores)"], ["dali", "kornia"]),
        ("decode", FULL, ["--max-side"], ["num_workers", "dali"]),  # workers == cores: no "more workers"
        ("decode", GPU, ["--max-side", "backend='dali'"], ["num_workers"]),
        ("decode", DALI, ["--max-side"], ["'dali'"]),  # already decoding on the GPU
        ("augment", GPU, ["backend='kornia'"], ["--max-side"]),
        ("augment", FULL, [], ["kornia", "num_workers"]),
        ("transform", RunFacts(num_workers=2, usable_cores=2, has_stage_times=True), ["per batch"], ["num_workers"]),
        ("collate", CPU, ["uint8 rather than float", "Raise num_workers"], []),
        ("fetch", REMOTE, ["ReadOptions.parallel_reads (now 8)", "cache_dir"], ["num_workers"]),
        # shards smaller than one ranged read: parallel_reads cannot help, prefetch_shards and bigger shards can
        ("fetch", SMALL_SHARDS, ["Shards (1.0 MB on average)", "prefetch_shards (now 2)", "--shard-size"],
         ["parallel_reads", "cache_dir"]),
        ("fetch", replace(SMALL_SHARDS, shard_bytes=64e3), ["Shards (64 kB on average)"], ["parallel_reads"]),
        ("read", FULL, ["NVMe"], ["num_workers"]),
        ("handoff", CPU, ["uint8"], ["num_workers"]),
        ("receive", CPU, ["uint8", "columns=..."], ["num_workers"]),  # unpickled in one process: workers do not help
        # text batches are token ids: no uint8 images to hand out, nothing to crop
        ("receive", replace(CPU, images=False), ["return tensors from collate_fn", "columns=..."], ["uint8"]),
        ("collate", replace(CPU, images=False), ["pad_to_multiple_of", "Raise num_workers"], ["uint8", "crop"]),
        ("h2d", replace(GPU, images=False), ["non_blocking=True"], ["uint8"]),
        ("loader", replace(FULL, images=False), ["prefetch_factor"], ["uint8"]),
        ("pin", replace(GPU, images=False), ["columns=..."], ["uint8"]),
        ("pin", CPU, ["pin_memory=False"], []),
        ("loader", FULL, ["prefetch_factor", "already use every core (8 workers, 8 usable cores)"], ["Raise num"]),
        ("loader", CPU, ["prefetch_factor", "Raise num_workers"], ["every core"]),
        ("pin", GPU, ["uint8"], ["pin_memory=False"]),
        (None, PLAIN, ["does not report per-stage times", "Set num_workers (0 now", "4 cores"], []),
        (None, GENERATOR, ["does not report per-stage times"], ["num_workers"]),
        (None, FULL, [], ["num_workers", "does not report"]),
    ],
)
def test_advice_is_in_stokers_knobs_and_true_for_the_run(stage, facts, present, absent) -> None:
    text = "\n".join(advice(stage, facts))
    for words in present:
        assert words in text
    for words in absent:
        assert words not in text


@pytest.mark.parametrize(
    ("stage", "facts", "expected"),
    [
        ("decode", CPU, "decode (CPU, pil, 2 workers)"),
        ("fetch", REMOTE, "remote reads (s3://bucket/data, 8 reads in flight per shard, 2 shards fetched ahead)"),
        ("fetch", SMALL_SHARDS, "remote reads (s3://b/d, 1 read in flight per shard, 2 shards fetched ahead)"),
        ("transform", PLAIN, "the transform / collate_fn (CPU, in the training process)"),
        ("transform", CPU, "decode and augment in stoker's transform (CPU, pil, 2 workers)"),
        ("collate", GENERATOR, "collate (CPU)"),
        ("handoff", CPU, "sending batches to the training process (pickling in the workers)"),
        ("receive", CPU, "taking batches in (unpickling in the training process)"),
    ],
)
def test_describe(stage, facts, expected) -> None:
    assert describe(stage, facts) == expected


def test_diagnose_names_the_stage_with_its_figure_and_rank() -> None:
    steady = Phase(100, 6.2, 3.8)
    verdict = diagnose(steady, Phase(2, 1.0, 0.1), {"decode": 30.0, "read": 2.0}, CPU, 0.05, where=" on rank 3")
    assert verdict.state == STARVING and verdict.stage == "decode"
    assert verdict.headline == "STARVING 62% of step time on rank 3: decode (CPU, pil, 2 workers)"
    assert verdict.stage_costs["decode"] == pytest.approx(0.15)
    assert any("--max-side" in line for line in verdict.advice)


def test_diagnose_without_stage_times_says_so() -> None:
    verdict = diagnose(Phase(50, 5.0, 5.0), Phase(1, 0.1, 0.1), None, PLAIN, 0.05)
    assert verdict.state == STARVING and verdict.stage is None
    assert verdict.headline == "STARVING (50.0% of step time waiting for data)"
    assert any("does not report per-stage times" in line for line in verdict.advice)


def test_too_short_run_gives_no_advice_and_says_why() -> None:
    verdict = diagnose(Phase(3, 3.0, 0.3), Phase(4, 1.0, 0.1), {"decode": 1.0}, CPU, 0.05)
    assert verdict.state == TOO_SHORT and verdict.advice == ()
    assert verdict.headline == "too short to judge: 3 steady steps after start-up (at least 10 needed)"
    assert math.isclose(verdict.startup.fraction, 1.0 / 1.1)


ONE_WORKER = RunFacts(num_workers=1, usable_cores=2, has_stage_times=True)


@pytest.mark.parametrize(
    ("costs", "workers", "expected"),
    [
        ({"read": 0.0001, "collate": 0.00005}, 1, None),  # every stage far faster than the 6 ms step
        ({"read": 0.0001, "transform": 0.009}, 1, "transform"),  # slower than the step alone
        ({"read": 0.003, "transform": 0.004}, 2, "transform"),  # 7 ms together in each worker, none alone
        ({"read": 0.003, "pin": 0.004}, 2, None),  # pin runs in the training process, apart from the workers
        ({"pin": 0.007, "read": 0.001}, 2, "pin"),
        ({"receive": 0.007, "handoff": 0.001}, 2, "receive"),  # unpickled in the training process, slower than a step
        ({"receive": 0.004, "read": 0.003}, 2, None),  # the training process's 4 ms are not added to a worker's 3
        ({"read": 0.0001, "collate": 0.00005}, 0, "read"),  # no workers: every stage is waited for in next()
        ({"read": 0.0001}, None, "read"),
        ({}, 2, None),
    ],
)
def test_a_stage_is_blamed_only_when_slower_than_the_step(costs, workers, expected) -> None:
    assert blamed_stage(costs, Phase(100, 0.05, 0.6), workers) == expected  # 6 ms of compute per step


def test_waits_with_every_stage_faster_than_the_step_are_the_hand_off_not_a_stage() -> None:
    # 100 steady steps of 6 ms compute and 0.45 ms wait (7%); local reads take 0.1 ms per batch in 1 worker
    verdict = diagnose(Phase(100, 0.045, 0.6), Phase(1, 0.3, 0.006), {"read": 0.01, "collate": 0.005}, ONE_WORKER,
                       0.05)
    assert verdict.state == STARVING and verdict.stage is None
    assert verdict.headline == (
        "STARVING 7% of step time: no loader stage is slower than the step (the slowest, local shard reads, takes "
        "0.10 ms per batch against 6.0 ms of compute per step); the 0.45 ms waited per step is not the workers' "
        "stage work: it goes to handing batches over to the training process, and to workers waiting for a core "
        "when the CPU is busy")
    text = "\n".join(verdict.advice)
    assert "neither more workers nor faster stages" in text and "starve_threshold" in text
    assert "Raise num_workers" not in text and "NVMe" not in text
    # the training process's part of the hand-off, when measured, is given with its figure
    received = diagnose(Phase(100, 0.045, 0.6), Phase(1, 0.3, 0.006), {"read": 0.01, "collate": 0.005,
                                                                        "receive": 0.008}, ONE_WORKER, 0.05)
    assert received.stage is None and received.headline == (
        "STARVING 7% of step time: no loader stage is slower than the step (the slowest, local shard reads, takes "
        "0.10 ms per batch against 6.0 ms of compute per step); the 0.45 ms waited per step is not the workers' "
        "stage work: it goes to handing batches over to the training process (unpickling them: 0.08 ms per batch), "
        "and to workers waiting for a core when the CPU is busy")
    # the same loop with a stage slower than the step names that stage and its advice
    slow = diagnose(Phase(100, 0.045, 0.6), Phase(1, 0.3, 0.006), {"read": 1.0}, ONE_WORKER, 0.05)
    assert slow.stage == "read" and slow.headline == "STARVING 7% of step time: local shard reads"
    assert any("Raise num_workers (1 now, 2 usable cores)" in line for line in slow.advice)


def test_stages_slower_only_together_are_named_with_their_sum() -> None:
    verdict = diagnose(Phase(100, 0.4, 0.5), Phase(2, 0.3, 0.01), {"read": 0.6, "transform": 0.8}, CPU, 0.05)
    assert verdict.stage == "transform"
    assert verdict.headline == (
        "STARVING 44% of step time: decode and augment in stoker's transform (CPU, pil, 2 workers), the largest of the "
        "stages each worker runs one after another (7.0 ms per batch together against 5.0 ms of compute per step; "
        "none alone is slower)")
    assert any("Raise num_workers (2 now, 8 usable cores)" in line for line in verdict.advice)
