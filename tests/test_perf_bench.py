"""`stoker bench`: verdicts on controlled pipelines, the CLI on a small packed dataset, and the examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.cli import main
from stoker.errors import ConfigError
from stoker.formats.pack import pack_dataset
from stoker.perf import monitor_report, stages
from stoker.perf.bench import Consumption, Stage, bench_facts, bench_pipeline, resolve_consumption, time_stage
from stoker.perf.stages import BenchOptions
from stoker.perf.verdict import judge_pipeline
from stoker.synthetic import make_image_tree, make_text_corpus

REPO = Path(__file__).resolve().parents[1]
IMAGE_STAGES = ["raw read", "read", "decode", "augment", "collate", "h2d", "loader"]


def _instant(items: int):
    return lambda: (items, 0)


def _sleepy(seconds: float):
    def step() -> tuple[int, int]:
        time.sleep(seconds)
        return 1, 0
    return step


@pytest.fixture(scope="module")
def packed_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    make_image_tree(root / "raw", num_classes=2, per_class=8, min_side=64, max_side=128, seed=3)
    pack_dataset(str(root / "raw"), str(root / "shards"), shard_size=32 << 10, workers=1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def packed_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-text")
    make_text_corpus(root / "corpus.jsonl", num_docs=120, seed=3)
    pack_dataset(str(root / "corpus.jsonl"), str(root / "shards"), format="msgpack", shard_size=16 << 10,
                 workers=1, progress=False)
    return root / "shards"


# ---- controlled pipelines ----


def test_artificially_slowed_stage_is_the_bottleneck() -> None:
    stages = [Stage("read", _instant(64)), Stage("decode", _sleepy(0.01)), Stage("collate", _instant(64))]
    report = bench_pipeline(stages, 0.1, consumption=Consumption(1_000, "img/s", 1, "test"), unit="img/s")
    v = report.verdict
    assert v is not None and not v.keeps_up
    assert v.bottleneck == "decode" and v.bottleneck_kind == "decode"
    assert v.pipeline_rate == pytest.approx(report.stages[1].rate, rel=1e-3)  # decode in series with instant stages
    assert any("--max-side" in line for line in v.advice)


def test_lanes_multiply_the_rate_of_one_copy() -> None:
    result = time_stage(Stage("augment", _sleepy(0.01), lanes=4), 0.05)
    assert result.rate == pytest.approx(4 * result.per_lane)
    assert result.lanes == 4


def test_fast_pipeline_keeps_up_with_a_slow_consumer() -> None:
    stages = [Stage("read", _instant(256)), Stage("decode", _instant(64)), Stage("loader", _instant(64))]
    report = bench_pipeline(stages, 0.05, consumption=Consumption(5, "img/s", 8, "test"), unit="img/s")
    v = report.verdict
    assert v is not None and v.keeps_up
    assert v.gpus_feedable > 8
    assert "headroom" in v.advice[0]


def test_a_failing_stage_is_reported_unavailable_and_left_out_of_the_verdict() -> None:
    def broken() -> tuple[int, int]:
        raise RuntimeError("no decoder")

    stages = [Stage("read", _instant(10)), Stage("decode", broken)]
    report = bench_pipeline(stages, 0.02, consumption=Consumption(1, "img/s", 1, "test"), unit="img/s")
    decode = report.stages[1]
    assert decode.rate is None and decode.note == "unavailable: RuntimeError: no decoder"
    assert report.verdict is not None and report.verdict.bottleneck == "read"
    assert report.to_dict()["stages"][1]["available"] is False


def test_consumption_from_a_step_or_the_reference_table() -> None:
    step = resolve_consumption(step_time=0.5, items_per_step=256, num_gpus=2)
    assert (step.rate, step.num_gpus, step.unit) == (512, 2, "img/s")
    ref = resolve_consumption(model="resnet50", gpu="h100", num_gpus=8)
    assert ref.rate == 7_000 and "MLPerf" in ref.source
    assert resolve_consumption() is None
    with pytest.raises(ConfigError, match="tokens/s"):
        resolve_consumption(model="llm-7b", gpu="h100", unit="img/s")
    with pytest.raises(ConfigError, match="either"):
        resolve_consumption(step_time=1, items_per_step=8, model="resnet50", gpu="h100")
    with pytest.raises(ConfigError, match="together"):
        resolve_consumption(model="resnet50")


# ---- the CLI on real packed data ----


def _bench_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["bench", *argv, "--json", "--seconds", "0.15", "--workers", "0", "--batch-size", "8"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_on_packed_images_keeps_up_with_a_slow_step(packed_images: Path, capsys, monkeypatch) -> None:
    # However fast this machine loads the 2-batch epochs, a round of them is short of the batches a judgement needs.
    monkeypatch.setattr("stoker.perf.stages.MIN_LOADER_BATCHES", 1 << 30)
    data = _bench_json(capsys, str(packed_images), "--step-time", "10")
    stages = {s["name"]: s for s in data["stages"]}
    assert [s["name"] for s in data["stages"]] == IMAGE_STAGES
    assert data["kind"] == "image" and data["unit"] == "img/s"
    for name in ("raw read", "read", "decode", "augment", "collate", "loader"):
        assert stages[name]["available"] and stages[name]["rate"] > 0, stages[name]
    assert stages["raw read"]["reference"] and stages["raw read"]["mb_per_s"] > 0
    assert data["consumption"]["rate"] == pytest.approx(0.8)  # 8 images per 10 s step
    assert data["verdict"]["keeps_up"] is True
    assert data["settings"]["samples"] == 16 and data["machine"]["cores"] >= 1
    # 2 batches an epoch, and (above) too few batches a round: the loader's rate says it is too small and too short
    # to judge
    assert "too small to judge: 2 batches per epoch" in stages["loader"]["note"]
    assert "too short to judge" in stages["loader"]["note"] and stages["loader"]["stable"] is False
    # The note names the option as the Python API spells it, and the flag for the command line.
    assert "raise seconds (--seconds on the command line)" in stages["loader"]["note"]


def test_cli_json_against_a_reference_fleet_names_a_measured_stage(packed_images: Path, capsys) -> None:
    data = _bench_json(capsys, str(packed_images), "--model", "resnet50", "--gpu", "h100", "--gpus", "1000")
    verdict = data["verdict"]
    assert verdict["keeps_up"] is False
    assert verdict["required_rate"] == 7_000_000
    measured = [s["name"] for s in data["stages"] if s["available"] and not s["reference"]]
    assert verdict["bottleneck"] in measured
    first = verdict["advice"][0]
    assert first.startswith(f"Stage '{verdict['bottleneck']}'") or first.startswith("The loader delivers")


def test_cli_table_on_packed_text(packed_text: Path, capsys) -> None:
    code = main(["bench", str(packed_text), "--seconds", "0.1", "--workers", "0", "--step-time", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "rate (tokens/s)" in out and "verdict: KEEPS UP" in out
    for name in ("raw read", "read", "collate", "loader"):
        assert f"\n{name} " in out


def test_a_missing_loader_is_reported_in_its_row_and_the_rest_still_judged(packed_images: Path, capsys,
                                                                           monkeypatch) -> None:
    def no_loader(*args, **kwargs):
        raise ImportError("stoker.dataloader is not installed")

    monkeypatch.setattr(stages, "make_loader", no_loader)
    data = _bench_json(capsys, str(packed_images), "--step-time", "10")
    loader = data["stages"][-1]
    assert loader["name"] == "loader" and not loader["available"]
    assert loader["note"] == "unavailable: ImportError: stoker.dataloader is not installed"
    assert data["verdict"]["keeps_up"] is True


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--seconds", "0", "--seconds 0.0 must be positive"),
    ("--batch-size", "0", "--batch-size 0 must be at least 1"),
    ("--workers", "-1", "--workers -1 must be 0 or more"),
    ("--gpus", "0", "--gpus 0 must be at least 1"),
])
def test_cli_rejects_a_bad_option_in_its_own_flags(packed_images: Path, capsys, flag, value, expected) -> None:
    assert main(["bench", str(packed_images), flag, value, "--step-time", "0.1"]) == 2
    assert f"error: {expected}" in capsys.readouterr().err


def test_bench_options_word_errors_for_python_callers() -> None:
    with pytest.raises(ConfigError, match=r"^batch_size=0 must be at least 1$"):
        BenchOptions(batch_size=0)


def test_cli_without_a_consumption_rate_says_how_to_get_a_verdict(packed_images: Path, capsys) -> None:
    assert main(["bench", str(packed_images), "--seconds", "0.05", "--workers", "0"]) == 0
    assert "--step-time SECONDS --batch-size N" in capsys.readouterr().out


def test_cli_rejects_a_unit_mismatch(packed_text: Path, capsys) -> None:
    assert main(["bench", str(packed_text), "--model", "resnet50", "--gpu", "a100"]) == 2
    assert "tokens/s" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(packed_images: Path, capsys, monkeypatch, tmp_path) -> None:
    real = monitor_report.importlib.util.find_spec
    monkeypatch.setattr(monitor_report.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    assert main(["bench", str(packed_images), "--plot", str(tmp_path / "x.png")]) == 2
    assert "stoker[plot]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_is_written(packed_images: Path, capsys, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    assert main(["bench", str(packed_images), "--seconds", "0.05", "--workers", "0", "--step-time", "1",
                 "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


# ---- examples ----


def _run_example(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_example_train_images(packed_images: Path) -> None:
    out = _run_example("train_images.py", str(packed_images), "--epochs", "1", "--batch-size", "8", "--workers", "1")
    assert "stoker.monitor report" in out


@pytest.mark.slow
def test_example_train_text(packed_text: Path) -> None:
    out = _run_example("train_text.py", str(packed_text), "--epochs", "1", "--max-tokens", "2048", "--workers", "1")
    assert "stoker.monitor report" in out and "padding" in out


# ---- bench --tune ----


def test_tune_recommends_the_cheapest_setting_that_feeds_a_slow_step(packed_images: Path, capsys) -> None:
    code = main(["bench", str(packed_images), "--tune", "--json", "--seconds", "0.2", "--batch-size", "8",
                 "--step-time", "100"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    tried = [(t["workers"], t["prefetch"]) for t in data["trials"]]
    assert tried[0] == (0, None) and (1, 2) in tried and len(tried) == len(set(tried))
    assert all(t["rate"] > 0 for t in data["trials"]), data["trials"]
    # 8 images per 100 s: every setting feeds it, so the cheapest one (no workers) is recommended.
    assert (data["recommended"]["workers"], data["recommended"]["prefetch"]) == (0, None)
    assert "cheapest setting that feeds" in data["why"]


def test_tune_without_a_rate_picks_near_the_fastest_and_prints_a_table(packed_text: Path, capsys) -> None:
    assert main(["bench", str(packed_text), "--tune", "--seconds", "0.1", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 4  # 0 workers, then 1.. workers at several prefetch depths
    assert "recommended: num_workers=" in out and "within 5% of the fastest" in out


@pytest.mark.parametrize("kind", ["read", "collate", "h2d", "loader"])  # the stages `stoker bench` times on text
def test_the_bench_advises_a_text_dataset_as_text(packed_text: Path, packed_images: Path, kind) -> None:
    # Whichever stage limits a text dataset, its advice is for batches of token ids made by pad_collate.
    text = bench_facts(str(packed_text), image=False, workers=2)
    assert text.images is False and text.sample_transform is False and text.backend is None
    verdict = judge_pipeline({"read": 1e6, kind: 1.0}, 100.0, facts=text)
    assert verdict.bottleneck == kind
    advice = " ".join(verdict.advice)
    assert "uint8" not in advice and "crop" not in advice and "--max-side" not in advice, advice
    images = bench_facts(str(packed_images), image=True, workers=2)
    assert images.images is True and images.backend == "pil"


def test_advice_for_a_starved_text_dataset_says_nothing_about_images(packed_text: Path, capsys) -> None:
    # A step of 1 us per batch needs far more tokens/s than any loader gives: the verdict advises, for text batches
    # of integer token ids (no uint8 images to hand out, nothing to crop).
    data = _bench_json(capsys, str(packed_text), "--step-time", "0.000001")
    verdict = data["verdict"]
    assert verdict["keeps_up"] is False and len(verdict["advice"]) > 1, verdict
    advice = " ".join(verdict["advice"])
    assert "uint8" not in advice and "image" not in advice and "crop" not in advice, advice
