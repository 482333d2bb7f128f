"""The autotuner's model, table by table: `tuning.estimate` (figures from measurements) and `tuning.propose`
(what to do about them). The process-level behaviour is in tests/test_autotune.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stoker.dataloader.tuning import Context, Estimate, Observed, Setting, estimate, memory_estimate, propose

MB = 1 << 20


def observed(**changes) -> Observed:
    """One worker making 10 batches at 10 ms each (1 core each), a 10 ms step, no waits, 8 idle cores."""
    base = Observed(workers=1, steps=(0.01,) * 10, waits=(0.0,) * 10, elapsed=0.2, segment_elapsed=0.2, busy=0.1,
                    made=10, cpu=0.1, queued=0.0, main_cpu=0.0, cores=8)
    return replace(base, **changes)


@pytest.mark.parametrize("seen, want", [
    # (what was measured, what the estimate must say)
    (observed(), dict(p=0.01, s=0.01, step=0.01, wait_fraction=0.0, starving=False, saturated=False)),
    # Half the loop's time waiting: starving.
    (observed(waits=(0.01,) * 10), dict(wait_fraction=0.5, starving=True)),
    # Waiting for a core is contention, not work: 4 ms of the 10 ms per batch were spent queued.
    (observed(busy=0.1, cpu=0.06, queued=0.04), dict(p=0.006, s=0.006)),
    # Queueing never makes p smaller than the CPU time.
    (observed(busy=0.1, cpu=0.08, queued=0.09), dict(p=0.008, s=0.008)),
    # No /proc: the CPU time is taken to be the wall time.
    (observed(cpu=None, queued=0.05), dict(p=0.01, s=0.01)),
    # Without workers the loop's wait is the production time.
    (observed(workers=0, waits=(0.03,) * 10, busy=0.0, made=0), dict(p=0.03, s=0.03)),
    # No batch made in the whole segment: at least the segment's length per batch.
    (observed(workers=2, made=0, busy=0.0, cpu=0.0), dict(p=0.4)),
    # Workers busy 90% of the time: saturated.
    (observed(busy=0.18, made=18, cpu=0.18), dict(saturated=True)),
    # One 1 s checkpointing step does not read as a slow consumer (clipped to 5 medians).
    (observed(steps=(0.01,) * 9 + (1.0,), waits=(0.0,) * 9 + (0.01,)), dict(step=0.01, starving=True)),
])
def test_estimate(seen, want):
    est = estimate(seen, starve_threshold=0.05)
    for name, value in want.items():
        got = getattr(est, name)
        assert got == pytest.approx(value, rel=1e-6) if isinstance(value, float) else got == value, name


def est(**changes) -> Estimate:
    """Workers at 20 ms per batch (CPU the same), a 5 ms step, plenty of cores, the loop starving."""
    base = Estimate(p=0.02, s=0.02, step=0.005, wait_fraction=0.6, starving=True, delivered_rate=50.0,
                    cpu_rate=8 * 0.9 / 0.02, saturated=True)
    return replace(base, **changes)


def ctx(**changes) -> Context:
    base = Context(setting=Setting(1, 2), tune_workers=True, tune_prefetch=False, min_workers=1, max_workers=32,
                   headroom=1.15, starve_threshold=0.05, shrink_surplus=0.75, prefetch_choices=(2, 4, 8),
                   budget=4096 * MB, worker_memory=64 * MB, batch_bytes=MB, bundle=1, cores=8, overhead_s=0.5,
                   horizon=10_000, experiments=True, floor=0, model_need=0)
    return replace(base, **changes)


@pytest.mark.parametrize("estimate_, context, setting, limit", [
    # need = ceil(1.15 / 5 ms x 20 ms) = 5 workers; 10k batches make the restart worth it.
    (est(), ctx(), Setting(5, 2), "consumer"),
    # The same gain over 20 batches does not pay for a 0.5 s restart.
    (est(), ctx(horizon=20), None, "consumer"),
    # max_workers caps it.
    (est(), ctx(max_workers=3), Setting(3, 2), "max_workers"),
    # So does the memory budget: (64 MB + 4 batches of 1 MB) per worker in 200 MB is 2 workers.
    (est(), ctx(budget=200 * MB), Setting(2, 2), "memory"),
    # The cores cap production: 2 free cores make 90 batches/s at 20 ms CPU each, fewer than the 230/s wanted.
    (est(cpu_rate=90.0), ctx(), Setting(2, 2), "cpu"),
    # Enough workers already: keep them.
    (est(starving=False, wait_fraction=0.0, saturated=False), ctx(setting=Setting(5, 2)), None, "consumer"),
    # One surplus worker of six is kept (hysteresis); three of eight are let go.
    (est(starving=False, wait_fraction=0.0), ctx(setting=Setting(6, 2)), None, "consumer"),
    (est(starving=False, wait_fraction=0.0), ctx(setting=Setting(8, 2)), Setting(5, 2), "consumer"),
    # The model says 5 suffice, yet the loop waits and gets far less: one more worker, as an experiment.
    (est(saturated=False, delivered_rate=100.0), ctx(setting=Setting(5, 2)), Setting(6, 2), "consumer"),
    # ...unless experiments stopped paying.
    (est(saturated=False, delivered_rate=100.0), ctx(setting=Setting(5, 2), experiments=False), None, "consumer"),
    # An experiment that paid set a floor the model may not go below.
    (est(starving=False, wait_fraction=0.0), ctx(setting=Setting(8, 2), floor=7), None, "consumer"),
    # Fixed workers, tuned prefetch: production keeps up on average but the loop waits: deeper prefetch.
    (est(p=0.004, saturated=False, cpu_rate=1800.0), ctx(setting=Setting(4, 2), tune_workers=False,
                                                         tune_prefetch=True), Setting(4, 4), "fixed num_workers"),
    # ...but not while production is saturated (a deficit, not bursts).
    (est(p=0.004, cpu_rate=1800.0), ctx(setting=Setting(4, 2), tune_workers=False, tune_prefetch=True), None,
     "fixed num_workers"),
])
def test_propose(estimate_, context, setting, limit):
    proposal = propose(estimate_, context)
    assert proposal.setting == setting, proposal.reason
    assert proposal.limit == limit
    if setting is not None:
        assert proposal.reason  # a change always says why


def test_a_setting_over_the_memory_budget_is_left_even_when_not_worth_a_restart():
    # 8 workers of 64 MB in a 256 MB budget: over it, so they shrink whatever the horizon.
    proposal = propose(est(starving=False, wait_fraction=0.0), ctx(setting=Setting(8, 2), budget=256 * MB, horizon=1))
    assert proposal.setting is not None and proposal.setting.workers == 3 and proposal.limit == "memory"


def test_memory_estimate_counts_workers_prefetch_and_bundles():
    assert memory_estimate(Setting(0, 2), 64 * MB, MB, 1) == 0
    assert memory_estimate(Setting(2, 4), 64 * MB, MB, 2) == 2 * (64 + (4 + 4)) * MB
