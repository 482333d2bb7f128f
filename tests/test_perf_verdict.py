"""The pipeline verdict on table cases, and the reference figures it draws on."""

from __future__ import annotations

import pytest

from stoker.errors import ConfigError
from stoker.perf.reference import CONSUMPTION, PEERS, SPEED_OF_LIGHT, consumption_rate, format_references, stage_limits
from stoker.perf.verdict import advice_for, consumption_from_step, format_table, judge_pipeline, stage_kind


@pytest.mark.parametrize(
    ("rates", "consumption", "gpus", "keeps_up", "bottleneck", "advice_word"),
    [
        # decode-bound ImageNet pipeline against one H100 (7,000 img/s)
        ({"read": 50_000, "decode": 1_200, "collate": 20_000, "loader": 1_150}, 7_000, 1, False, "decode", "DALI"),
        ({"read": 800, "decode": 9_000}, 2_500, 1, False, "read", "local NVMe"),
        ({"read": 60_000, "decode": 9_000, "h2d": 5_000}, 2_500, 4, False, "h2d", "pin_memory"),
        ({"read": 60_000, "augment": 3_000}, 2_500, 2, False, "augment", "Kornia"),
        ({"read": 60_000, "collate": 1_000}, 2_500, 1, False, "collate", "batch level"),
        # every stage alone is fast but the loader end to end is not: the glue between stages is the problem
        ({"read": 20_000, "decode": 20_000, "loader": 3_000}, 2_500, 2, False, "loader", "num_workers"),
        # loader close to "stages back to back": the slowest stage is named, not the loader
        ({"read": 20_000, "decode": 15_000, "loader": 8_000}, 2_500, 4, False, "decode", "workers"),
        ({"read": 60_000, "decode": 30_000, "h2d": 100_000}, 7_000, 4, True, "decode", "headroom"),
        ({"shuffle": 100}, 2_500, 1, False, "shuffle", "profile"),
    ],
)
def test_verdict_table(rates, consumption, gpus, keeps_up, bottleneck, advice_word) -> None:
    v = judge_pipeline(rates, consumption, gpus)
    assert v.keeps_up is keeps_up
    assert v.bottleneck == bottleneck
    assert v.pipeline_rate == min(rates.values())
    assert v.required_rate == consumption * gpus
    assert v.gpus_feedable == pytest.approx(min(rates.values()) / consumption)
    assert any(advice_word in line for line in v.advice), v.advice


def test_starved_verdict_quantifies_the_shortfall_and_decode_cores() -> None:
    v = judge_pipeline({"read": 50_000, "decode": 1_200}, consumption_rate("resnet50", "h100"))
    assert v.unit == "img/s"
    assert v.gpus_feedable == pytest.approx(1_200 / 7_000)
    # 7,000 img/s at the published 500-850 img/s per core is 9-14 cores
    assert "5.8x too slow" in v.advice[0]
    assert "~9-14 cores" in v.advice[0]


def test_verdict_in_tokens_for_a_language_model() -> None:
    v = judge_pipeline({"tokenize": 200_000, "collate": 500_000}, consumption_rate("llm-7b", "h100"), num_gpus=8)
    assert v.unit == "tokens/s"
    assert v.required_rate == 8 * 10_600
    assert v.keeps_up
    assert v.gpus_feedable == pytest.approx(200_000 / 10_600)


def test_a_stage_that_delivers_nothing() -> None:
    v = judge_pipeline({"read": 0, "decode": 5_000}, 1_000)
    assert v.bottleneck == "read" and v.gpus_feedable == 0 and not v.keeps_up
    assert "delivers nothing" in v.advice[0]


@pytest.mark.parametrize(
    ("rates", "consumption", "gpus"),
    [({}, 100, 1), ({"read": -1}, 100, 1), ({"read": float("nan")}, 100, 1), ({"read": 10}, 0, 1),
     ({"read": 10}, 100, 0)],
)
def test_verdict_rejects_bad_input(rates, consumption, gpus) -> None:
    with pytest.raises(ConfigError):
        judge_pipeline(rates, consumption, gpus)


def test_format_table_marks_the_bottleneck() -> None:
    v = judge_pipeline({"read": 50_000, "decode": 1_200}, 7_000, unit="img/s")
    text = format_table(v)
    decode_line = next(line for line in text.splitlines() if line.startswith("decode"))
    read_line = next(line for line in text.splitlines() if line.startswith("read"))
    assert "<- bottleneck" in decode_line and "<- bottleneck" not in read_line
    assert "1,200" in decode_line and "0.17" in decode_line
    assert "STARVED" in text and "7,000 img/s" in text
    assert "KEEPS UP" in format_table(judge_pipeline({"read": 50_000}, 7_000))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("jpeg_decode", "decode"), ("h2d", "h2d"), ("pin_memory_copy", "h2d"), ("s3_read", "read"),
     ("augment", "augment"), ("transforms", "augment"), ("collate", "collate"), ("loader", "loader"),
     ("end_to_end", "loader"), ("shuffle", None)],
)
def test_stage_kind(name, kind) -> None:
    assert stage_kind(name) == kind


def test_advice_for_unknown_stage_suggests_profiling() -> None:
    assert "profile" in advice_for("mystery")[0]
    assert advice_for("decode") != advice_for("read")


def test_consumption_from_step() -> None:
    assert consumption_from_step(0.1, 256) == pytest.approx(2_560)
    with pytest.raises(ConfigError):
        consumption_from_step(0.0, 256)


def test_reference_lookup() -> None:
    assert consumption_rate("ResNet50", "H100").rate == 7_000
    llm = consumption_rate("llm-7b", "h100")
    assert (llm.rate, llm.unit) == (10_600, "tokens/s")
    with pytest.raises(ConfigError, match="resnet50"):
        consumption_rate("resnet51", "h100")


def test_every_reference_names_its_source() -> None:
    text = format_references()
    for entry in (*CONSUMPTION, *SPEED_OF_LIGHT, *PEERS):
        assert entry.source.strip()
        assert entry.source in text
    assert all(limit.low <= limit.high for limit in SPEED_OF_LIGHT)
    assert {limit.stage for limit in SPEED_OF_LIGHT} == {"read", "decode", "h2d"}
    assert stage_limits("decode")[0].unit == "img/s"
    assert stage_limits("collate") == ()
