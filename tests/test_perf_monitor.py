"""stoker.monitor on controlled pipelines: sleeps stand in for a slow loader and for the training step.

Sleeps are long against scheduler noise and assertions use wide margins, so a busy machine cannot flip them.
"""

from __future__ import annotations

import csv
import logging
import sys
import time

import numpy as np
import pytest
import torch

import stoker
from stoker.errors import ConfigError, MissingExtraError
from stoker.perf.monitor import Monitor, MonitorConfig, count_samples, monitor


class SleepyLoader:
    """Yields `n` batches of `batch` rows, sleeping `delay` seconds before each, like a loader that cannot keep up."""

    def __init__(self, n: int, delay: float, batch: int = 8) -> None:
        self.n, self.delay, self.batch = n, delay, batch

    def __iter__(self):
        for _ in range(self.n):
            time.sleep(self.delay)
            yield torch.zeros(self.batch, 3)

    def __len__(self) -> int:
        return self.n


class StagedLoader(SleepyLoader):
    """A slow loader that also reports where its time goes: busy seconds per stage grow with each batch."""

    per_batch = {"read": 0.001, "decode": 0.006, "collate": 0.001}

    def __iter__(self):
        self.batches = 0
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def stage_times(self) -> dict[str, float]:
        return {name: seconds * getattr(self, "batches", 0) for name, seconds in self.per_batch.items()}


def run(m: Monitor, compute: float) -> Monitor:
    with m:
        for _ in m:
            time.sleep(compute)
    return m


def quiet(**options) -> dict:
    return {"log": lambda line: None, **options}


def test_slow_loader_is_reported_as_starving_on_the_input_pipeline() -> None:
    lines: list[str] = []
    m = run(monitor(SleepyLoader(15, 0.02), log=lines.append, log_every=5), compute=0.002)
    metrics = m.metrics()
    # 20 ms of loading against 2 ms of compute is ~90% waiting; a loaded machine stretches both sleeps.
    assert metrics["data_wait_fraction"] > 0.4
    assert metrics["starving"] is True
    assert metrics["bottleneck"] == "input pipeline"
    assert metrics["steps"] == 15 and metrics["samples"] == 120
    assert metrics["advice"]  # generic input-pipeline advice when the loader exposes no stage timings
    report = m.last_report
    assert report["starving"] and report["bottleneck"] == "input pipeline" and report["slowest_rank"] == 0
    intervals = [line for line in lines if line.startswith("[stoker.monitor] step")]
    assert len(intervals) == 3 and all("STARVING" in line for line in intervals)  # steps 5, 10, 15
    assert any("input pipeline" in line for line in lines)


def test_fast_loader_keeps_up() -> None:
    batches = [torch.zeros(16, 3)] * 20
    m = run(monitor(batches, **quiet()), compute=0.02)
    metrics = m.metrics()
    assert metrics["data_wait_fraction"] < 0.05
    assert metrics["starving"] is False
    assert metrics["bottleneck"] == "compute"
    assert metrics["advice"] == []
    # 20 ms steps: anywhere from ~10 to 50 steps/s on a busy machine, never more
    assert 5 < metrics["steps_per_s"] < 50
    assert metrics["samples_per_s"] == pytest.approx(16 * metrics["steps_per_s"])
    assert metrics["samples_per_s_if_fed"] >= metrics["samples_per_s"]


def test_stage_times_name_the_slow_stage_and_give_its_advice() -> None:
    lines: list[str] = []
    m = run(monitor(StagedLoader(15, 0.02), log=lines.append), compute=0.002)
    metrics = m.metrics()
    assert metrics["bottleneck_stage"] == "decode"
    assert metrics["stage_shares"]["decode"] == pytest.approx(0.75)
    # the first batch is start-up: the stage clocks count the 14 steady batches only
    assert metrics["stage_seconds"]["decode"] == pytest.approx(14 * 0.006)
    assert any("--max-side" in a for a in metrics["advice"])
    assert "decode 6.0" in "\n".join(lines)


def test_a_single_rank_report_judges_the_rank_once(monkeypatch) -> None:
    from stoker.perf import diagnosis

    calls = []
    real = diagnosis.diagnose
    monkeypatch.setattr(diagnosis, "diagnose", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = monitor(StagedLoader(15, 0.001), log_every=0, **quiet())
    for _ in m:
        pass
    calls.clear()
    report = m.report()
    assert len(calls) == 1
    assert report["ranks"][0]["headline"] == report["headline"] == report["local"]["headline"]
    assert report["ranks"][0]["stage"] == report["bottleneck_stage"] == "decode"


def test_stage_times_found_on_the_dataset_as_a_plain_dict() -> None:
    class Dataset:
        stage_times = {"read": 0.0, "decode": 0.0}

    class Loader(SleepyLoader):
        dataset = Dataset()

        def __iter__(self):
            for batch in super().__iter__():
                self.dataset.stage_times["read"] += 0.003
                self.dataset.stage_times["decode"] += 0.001
                yield batch

    m = run(monitor(Loader(14, 0.02), **quiet()), compute=0.001)
    assert m.metrics()["bottleneck_stage"] == "read"
    assert any("NVMe" in a for a in m.metrics()["advice"])


def test_step_boundaries_split_wait_and_compute() -> None:
    m = run(monitor(SleepyLoader(10, 0.03), **quiet()), compute=0.01)
    metrics = m.metrics()
    assert metrics["wait_ms_p50"] >= 25  # a 30 ms sleep never returns early
    assert metrics["step_ms_p50"] >= 35
    assert metrics["wait_s"] > metrics["compute_s"] >= 10 * 0.009
    assert metrics["elapsed_s"] == pytest.approx(metrics["wait_s"] + metrics["compute_s"])


def test_log_every_seconds() -> None:
    lines: list[str] = []
    m = run(monitor(SleepyLoader(20, 0.01), log=lines.append, log_every=0, log_every_s=0.05), compute=0.001)
    intervals = [line for line in lines if "step " in line and "|" in line]
    # 20 steps of >= 11 ms take >= 0.22 s: at least one line, and never more than one per 50 ms of the run.
    assert 1 <= len(intervals) <= m.metrics()["elapsed_s"] / 0.05 + 1


def test_csv_output(tmp_path) -> None:
    path = tmp_path / "monitor.csv"
    run(monitor(SleepyLoader(12, 0.005, batch=4), **quiet(log_every=5, csv_path=path)), compute=0.001)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["kind"] for row in rows] == ["interval", "interval", "total"]
    assert [int(row["step"]) for row in rows] == [5, 10, 12]
    assert [int(row["steps"]) for row in rows] == [5, 5, 12]
    assert int(rows[-1]["samples"]) == 48
    for row in rows:
        assert 0 <= float(row["data_wait_fraction"]) <= 1
        assert float(row["steps_per_s"]) > 0
        assert row["rank"] == "0"


def test_metrics_accumulate_over_epochs_and_report_each_pass_once() -> None:
    lines: list[str] = []
    with monitor([np.zeros((2, 2))] * 5, log=lines.append, log_every=0) as m:
        for _ in range(2):
            for _ in m:
                pass
    assert m.metrics()["steps"] == 10
    assert m.metrics()["samples"] == 20
    assert sum(line.startswith("stoker.monitor report") for line in lines) == 2  # one per pass, none repeated


def test_break_then_close_finishes_the_running_step() -> None:
    with monitor(SleepyLoader(50, 0.001), **quiet()) as m:
        for i, _ in enumerate(m):
            time.sleep(0.01)
            if i == 4:
                break
    assert m.last_report["local"]["steps"] == 5
    assert m.metrics()["compute_s"] >= 5 * 0.009  # the 5th step's compute was counted at close
    assert m.close() is m.last_report  # idempotent


def test_exception_in_the_loop_still_reports_and_propagates() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with monitor(SleepyLoader(10, 0.001), **quiet()) as m:
            for i, _ in enumerate(m):
                if i == 2:
                    raise RuntimeError("boom")
    assert m.last_report["local"]["steps"] == 3


def test_batch_size_override_counts_tokens() -> None:
    batches = [{"input_ids": torch.zeros(4, 128)}] * 3
    m = monitor(batches, **quiet(batch_size=lambda b: b["input_ids"].numel()))
    list(m)
    assert m.metrics()["samples"] == 3 * 4 * 128
    m = monitor(batches, **quiet(batch_size=32))
    list(m)
    assert m.metrics()["samples"] == 96


def test_uncountable_batches_leave_samples_unknown() -> None:
    m = monitor([object()] * 4, **quiet())
    assert len(list(m)) == 4
    metrics = m.metrics()
    assert metrics["samples"] is None and metrics["samples_per_s"] is None
    assert metrics["steps"] == 4
    assert m.last_report["samples_per_s"] is None


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (torch.zeros(5, 3), 5),
        (np.zeros((7, 2)), 7),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(4)}, 4),
        ({"meta": "shard-0", "x": torch.zeros(6)}, 6),
        ((torch.zeros(3, 224, 224), torch.zeros(3)), 3),
        ([{"x": torch.zeros(2)}, "labels"], 2),
        (["a", "b", "c"], 3),
        ([], 0),
        (torch.tensor(1.0), None),
        (42, None),
    ],
)
def test_count_samples(batch, expected) -> None:
    assert count_samples(batch) == expected


def test_len_passes_through_and_the_package_exports_monitor() -> None:
    assert len(monitor(SleepyLoader(7, 0))) == 7
    assert stoker.monitor is monitor


def test_logger_option_and_default_logger(caplog) -> None:
    logger = logging.getLogger("test.perf")
    with caplog.at_level(logging.INFO):
        list(monitor([torch.zeros(1)] * 3, log=logger, log_every=1))
        list(monitor([torch.zeros(1)] * 3, log_every=1))  # default: the "stoker.monitor" logger
    by_logger = {name: [r for r in caplog.records if r.name == name] for name in ("test.perf", "stoker.monitor")}
    assert len(by_logger["test.perf"]) == 4 and len(by_logger["stoker.monitor"]) == 4  # 3 lines + report


def test_default_falls_back_to_stderr_when_logging_is_unconfigured(monkeypatch, capsys) -> None:
    monkeypatch.setattr(logging.getLogger("stoker.monitor"), "hasHandlers", lambda: False)
    list(monitor([torch.zeros(1)] * 2, log_every=0))
    assert "stoker.monitor report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [{"starve_threshold": 0}, {"starve_threshold": 1.5}, {"window": 0}, {"log_every": -1}, {"log_every_s": -1.0},
     {"cuda_sync_every": -2}, {"batch_size": 0}, {"no_such_option": 1}],
)
def test_bad_options_raise_config_error(options) -> None:
    with pytest.raises(ConfigError):
        monitor([], **options)


def test_config_object_and_keyword_overrides() -> None:
    base = MonitorConfig(log_every=7, starve_threshold=0.2)
    m = monitor([], base, starve_threshold=0.3)
    assert (m.config.log_every, m.config.starve_threshold) == (7, 0.3)
    with pytest.raises(AttributeError):
        base.log_every = 3  # frozen


def test_explicit_distributed_or_cuda_without_them_is_an_error(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="distributed"):
        monitor([], distributed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda"):
        monitor([], cuda=True)


@pytest.mark.parametrize(("cuda", "initialized", "every", "expected"),
                         [(None, True, 4, 3), (None, False, 4, 0), (True, False, 1, 11), (False, True, 1, 0)])
def test_cuda_synchronize_schedule(monkeypatch, cuda, initialized, every, expected) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(1))
    list(monitor([torch.zeros(1)] * 10, **quiet(cuda=cuda, cuda_sync_every=every)))
    # every=4: before steps 0, 4, 8; every=1: before each of the 10 steps and the next() that ends the pass;
    # never in auto mode without a CUDA context
    assert len(calls) == expected


def test_tensorboard_scalars(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(monitor(SleepyLoader(10, 0.001), **quiet(log_every=5, tensorboard_dir=tmp_path)), compute=0.001)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "stoker/data_wait_fraction" in tags and "stoker/total/steps_per_s" in tags
    assert [e.step for e in events.Scalars("stoker/data_wait_fraction")] == [5, 10]


def test_tensorboard_missing_names_the_extra(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(MissingExtraError) as info:
        monitor([], tensorboard_dir=tmp_path)
    assert info.value.extra == "tensorboard" and "stoker[tensorboard]" in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loop_with_cuda_sync() -> None:
    weights = torch.randn(2048, 2048, device="cuda")
    for loader_delay, starving in ((0.03, True), (0.0, False)):
        batches = SleepyLoader(20, loader_delay, batch=64)
        with monitor(batches, **quiet(cuda=True, cuda_sync_every=1)) as m:
            for batch in m:
                x = batch.cuda().sum() + weights
                for _ in range(20):  # ~ms of queued GPU work that only the sync makes visible
                    x = x @ weights
        assert m.metrics()["starving"] is starving


def test_empty_loader_reports_without_crashing() -> None:
    lines: list[str] = []
    m = monitor([], log=lines.append)
    assert list(m) == []
    assert m.metrics()["steps"] == 0 and m.metrics()["starving"] is False
    assert lines and lines[0].startswith("stoker.monitor report: 0 steps")


def test_json_report_and_stage_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    json_path, png = tmp_path / "report-{rank}.json", tmp_path / "stages.png"
    lines: list[str] = []
    run(monitor(StagedLoader(15, 0.01), log=lines.append, log_every=5, json_path=json_path, plot=png,
                csv_path=tmp_path / "m.csv"), compute=0.001)
    import json

    saved = json.loads((tmp_path / "report-0.json").read_text())
    assert saved["state"] == "STARVING" and saved["bottleneck_stage"] == "decode"
    assert saved["ranks"][0]["stage_ms_per_batch"]["decode"] == pytest.approx(6.0)
    assert png.read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["state"] for row in rows] == ["STARVING", "STARVING", "STARVING", "STARVING"]
    assert rows[-1]["stage"] == "decode"


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path) -> None:
    from stoker.perf import monitor_report

    real = monitor_report.importlib.util.find_spec
    monkeypatch.setattr(monitor_report.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(MissingExtraError, match=r"stoker\[plot\]"):
        monitor([], plot=tmp_path / "x.png")
