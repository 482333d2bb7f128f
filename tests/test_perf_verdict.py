"""The pipeline verdict on table cases, and the reference figures it draws on."""

from __future__ import annotations

import pytest

from stoker.errors import ConfigError
from stoker.perf.reference import CONSUMPTION, PEERS, SPEED_OF_LIGHT, consumption_rate, format_references, stage_limits
from stoker.perf.diagnosis import RunFacts
from stoker.perf.verdict import consumption_from_step, format_table, judge_pipeline, stage_kind


@pytest.mark.parametrize(
    ("rates", "consumption", "gpus", "keeps_up", "bottleneck", "pipeline", "advice_word"),
    [
        # decode-bound ImageNet pipeline against one H100 (7,000 img/s): the loader's measured rate is the pipeline's
        ({"read": 50_000, "decode": 1_200, "collate": 20_000, "loader": 1_150}, 7_000, 1, False, "decode", 1_150,
         "--max-side"),
        # no loader measured: the worker stages one after another (1 / (1/800 + 1/9,000) = 735)
        ({"read": 800, "decode": 9_000}, 2_500, 1, False, "read", 735, "NVMe"),
        # h2d overlaps with the workers' work, so it limits alone
        ({"read": 60_000, "decode": 9_000, "h2d": 5_000}, 2_500, 4, False, "h2d", 5_000, "pin_memory"),
        ({"read": 60_000, "augment": 3_000}, 2_500, 2, False, "augment", 2_857, "TransformSpec"),
        ({"read": 60_000, "collate": 1_000}, 2_500, 1, False, "collate", 984, "uint8"),
        # every stage alone is fast but the loader end to end is not: the time goes between stages
        ({"read": 20_000, "decode": 20_000, "loader": 3_000}, 2_500, 2, False, "loader", 3_000, "prefetch_factor"),
        # loader close to the stages one after another (8,571): the stage taking most of the time is named
        ({"read": 20_000, "decode": 15_000, "loader": 8_000}, 2_500, 4, False, "decode", 8_000, "--max-side"),
        ({"read": 60_000, "decode": 30_000, "h2d": 100_000}, 7_000, 4, False, "decode", 20_000, "--max-side"),
        ({"read": 600_000, "decode": 300_000, "h2d": 100_000}, 7_000, 4, True, "h2d", 100_000, "headroom"),
        ({"shuffle": 100}, 2_500, 1, False, "shuffle", 100, "profile"),
    ],
)
def test_verdict_table(rates, consumption, gpus, keeps_up, bottleneck, pipeline, advice_word) -> None:
    v = judge_pipeline(rates, consumption, gpus)
    assert v.keeps_up is keeps_up
    assert v.bottleneck == bottleneck
    assert v.pipeline_rate == pytest.approx(pipeline, abs=1)
    assert v.required_rate == consumption * gpus
    assert v.gpus_feedable == pytest.approx(v.pipeline_rate / consumption)
    assert v.below_need == tuple(name for name, rate in rates.items() if rate < consumption * gpus)
    assert any(advice_word in line for line in v.advice), v.advice


@pytest.mark.parametrize(("busy", "bottleneck", "words"), [
    (None, "loader", "lost between stages"),
    (0.3, "loader", "lost between stages"),  # workers idle most of the time: the time goes between stages
    (0.95, "decode", "ran slower inside the loader"),  # workers busy in their stages: the stages are the limit
])
def test_the_loaders_own_clocks_decide_between_glue_and_stages(busy, bottleneck, words) -> None:
    v = judge_pipeline({"read": 20_000, "decode": 15_000, "loader": 3_000}, 5_000, loader_busy=busy)
    assert v.bottleneck == bottleneck and v.pipeline_rate == 3_000
    assert words in v.advice[0]


def test_a_stage_above_the_need_is_never_called_too_slow() -> None:
    # the bench case from the field: decode alone 3,922 img/s, the loader 2,171, the need 2,500
    v = judge_pipeline({"read": 20_000, "decode": 3_922, "augment": 9_000, "collate": 40_000, "loader": 2_171},
                       2_500, unit="img/s")
    assert not v.keeps_up and v.below_need == ("loader",)
    assert v.bottleneck == "decode"  # the workers' serial work (2,508/s) explains the loader's 2,171
    assert "too slow" not in v.advice[0]
    assert "2,171 img/s, below the 2,500 img/s needed by 1 GPU" in v.advice[0]
    assert "No stage alone is below the need" in v.advice[0]


def test_advice_about_workers_only_when_the_run_can_add_them() -> None:
    rates = {"read": 60_000, "decode": 1_000}
    few = judge_pipeline(rates, 2_500, facts=RunFacts(num_workers=2, usable_cores=16))
    full = judge_pipeline(rates, 2_500, facts=RunFacts(num_workers=16, usable_cores=16))
    assert any("Raise num_workers (2 now, 16 usable cores)" in line for line in few.advice)
    assert not any("num_workers" in line for line in full.advice)


def test_starved_verdict_quantifies_the_shortfall_and_decode_cores() -> None:
    v = judge_pipeline({"read": 50_000, "decode": 1_200}, consumption_rate("resnet50", "h100"))
    assert v.unit == "img/s"
    assert v.gpus_feedable == pytest.approx(1_171.875 / 7_000)  # read and decode one after another in a worker
    # 7,000 img/s at the published 500-850 img/s per core is 9-14 cores
    assert "5.8x too slow" in v.advice[0]
    assert "~9-14 cores" in v.advice[0]


def test_verdict_in_tokens_for_a_language_model() -> None:
    v = judge_pipeline({"tokenize": 200_000, "collate": 500_000}, consumption_rate("llm-7b", "h100"), num_gpus=8)
    assert v.unit == "tokens/s"
    assert v.required_rate == 8 * 10_600
    assert v.keeps_up
    assert v.gpus_feedable == pytest.approx(142_857.14 / 10_600)  # 1 / (1/200,000 + 1/500,000)


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
    assert "<- below need, bottleneck" in decode_line and "<-" not in read_line
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


def test_a_loader_measured_alone_is_judged_on_its_own_rate() -> None:
    # Only the end-to-end rate is known (no stage timed apart): it is the pipeline's rate and the bottleneck.
    verdict = judge_pipeline({"loader": 1_000}, 2_500)
    assert verdict.bottleneck == "loader" and verdict.pipeline_rate == 1_000 and not verdict.keeps_up
