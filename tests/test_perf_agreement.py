"""`stoker bench` and `stoker.monitor` name the same stage for the same dataset and loader settings."""

from __future__ import annotations

import time

import pytest

import stoker
from stoker.perf.bench import bench_dataset
from stoker.perf.loaders import clock_stage, make_loader
from stoker.perf.stages import BenchOptions
from stoker.perf.verdict import Consumption


@pytest.mark.parametrize("bench_stage, expected", [("read", "read"), ("decode", "transform"),
                                                   ("collate", "transform"), ("loader", "handoff")])
def test_clock_stage_of_each_bench_stage(bench_stage, expected) -> None:
    assert clock_stage(bench_stage) == expected
    assert clock_stage("read", remote=True) == "fetch"


def test_bench_and_monitor_name_the_same_stage(large_jpegs) -> None:
    batch, workers, size = 8, 1, 224
    # A step of 1 ms per batch of 8 needs 8,000 img/s: far more than one worker decodes, so both must find the
    # loader short and say where.
    need = Consumption(batch / 0.001, "img/s", 1, "a 1 ms step")
    report = bench_dataset(large_jpegs, BenchOptions(seconds=1.5, batch_size=batch, workers=workers, size=size),
                           consumption=need)
    assert report.verdict is not None and not report.verdict.keeps_up

    loader, _ = make_loader(large_jpegs, image=True, batch_size=batch, workers=workers, size=size)
    with stoker.monitor(loader, log=lambda line: None) as m:
        for _ in m:
            time.sleep(0.001)
    live = m.last_report
    assert live["state"] == "STARVING"
    assert clock_stage(report.verdict.bottleneck) == live["bottleneck_stage"] == "transform"
