"""Decide whether an input pipeline can feed N GPUs, which stage limits it, and what to do about it.

Pure functions over numbers: the caller measures stage rates (e.g. `stoker bench`) and picks a consumption rate,
either measured (`consumption_from_step`) or published (`stoker.perf.reference.consumption_rate`).

The model of the pipeline is stoker's own: each loader worker reads, decodes, augments and collates its batch one
step after another, so those stages add up (their rates, each already multiplied by the workers, combine as
1 / sum(1 / rate)); the host-to-device copy overlaps with them. A measured end-to-end rate ("loader") is the
pipeline's rate when present; when it falls well below what the stages explain, the time goes between stages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from stoker.errors import ConfigError
from stoker.perf.diagnosis import RunFacts, advice
from stoker.perf.reference import ConsumptionRate, consumption_rate, stage_limits

# Stage kinds we have advice for, matched by keyword in the stage's name (first match wins, so order matters:
# "h2d_copy" must be h2d, "read_decode" is treated as read).
_KIND_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loader", ("loader", "end_to_end", "end-to-end", "e2e", "total")),
    ("h2d", ("h2d", "to_device", "pin", "copy")),
    ("read", ("read", "fetch", "download", "storage")),
    ("decode", ("decode", "decompress")),
    ("augment", ("augment", "transform")),
    ("collate", ("collate",)),
)
# Kinds that overlap with the workers' serial work instead of adding to it.
_OVERLAPPING = frozenset({"h2d"})

# An end-to-end rate below this fraction of what the stages explain means time is lost between stages.
_GLUE_LOSS = 0.8


@dataclass(frozen=True)
class Verdict:
    """The answer to "can this pipeline feed these GPUs?", with the numbers behind it."""

    stage_rates: Mapping[str, float]
    consumption_rate: float  # items/s one GPU consumes
    num_gpus: int
    unit: str
    pipeline_rate: float  # items/s the pipeline delivers: the loader end to end, else what the stages explain
    required_rate: float  # consumption_rate * num_gpus
    gpus_feedable: float  # pipeline_rate / consumption_rate; may be fractional
    keeps_up: bool
    bottleneck: str  # name of the stage that limits the end-to-end rate
    bottleneck_kind: str | None  # read, decode, augment, collate, h2d, loader, or None if unrecognized
    advice: tuple[str, ...]
    below_need: tuple[str, ...] = ()  # stages whose own rate is below the required rate
    worker_rate: float | None = None  # the worker stages one after another, when there are any


@dataclass(frozen=True)
class Consumption:
    """How fast one GPU eats input, and for how many GPUs the pipeline must keep up."""

    rate: float  # items/s per GPU
    unit: str
    num_gpus: int
    source: str  # where the figure comes from: a measured step or a published reference


def stage_kind(stage: str) -> str | None:
    """Map a stage name such as "jpeg_decode" or "h2d" to a kind that has advice, or None."""
    name = stage.lower()
    for kind, words in _KIND_KEYWORDS:
        if any(word in name for word in words):
            return kind
    return None


def consumption_from_step(seconds_per_step: float, items_per_step: float) -> float:
    """Return the items/s one GPU consumes when a step of `items_per_step` items takes `seconds_per_step`."""
    if not seconds_per_step > 0 or not items_per_step > 0:
        raise ConfigError(f"need a positive step time and batch size, got {seconds_per_step} s and {items_per_step}")
    return items_per_step / seconds_per_step


def resolve_consumption(*, step_time: float | None = None, items_per_step: float | None = None,
                        model: str | None = None, gpu: str | None = None, num_gpus: int = 1,
                        unit: str = "img/s") -> Consumption | None:
    """The consumption rate from a measured step (`step_time`, `items_per_step`) or the reference table; or None."""
    if num_gpus < 1:
        raise ConfigError(f"num_gpus={num_gpus} must be at least 1")
    if step_time is not None and model is not None:
        raise ConfigError("give either a measured step (step_time, items_per_step) or a reference (model, gpu)")
    if step_time is not None:
        if not step_time > 0 or not items_per_step or items_per_step <= 0:
            raise ConfigError(f"need a positive step_time and items_per_step, got {step_time} s and {items_per_step}")
        what = unit.split("/")[0]
        return Consumption(items_per_step / step_time, unit, num_gpus,
                           f"measured step: {items_per_step:,.0f} {what} in {step_time:g} s")
    if model is not None or gpu is not None:
        if model is None or gpu is None:
            raise ConfigError("model and gpu go together, e.g. model='resnet50', gpu='h100'")
        ref = consumption_rate(model, gpu)
        if ref.unit != unit:
            raise ConfigError(f"{model} on {gpu} is rated in {ref.unit}, but this dataset is measured in {unit}")
        return Consumption(ref.rate, ref.unit, num_gpus, f"{ref.workload} [{ref.source}]")
    return None


def serial_rate(rates: Mapping[str, float]) -> float:
    """The rate of stages run one after another: 1 / sum(1 / rate); 0 when any of them delivers nothing."""
    return 0.0 if not rates or 0 in rates.values() else 1.0 / sum(1.0 / r for r in rates.values())


def judge_pipeline(
    stage_rates: Mapping[str, float],
    consumption: float | ConsumptionRate,
    num_gpus: int = 1,
    *,
    unit: str | None = None,
    facts: RunFacts | None = None,
    loader_busy: float | None = None,
) -> Verdict:
    """Judge whether stages running at `stage_rates` (items/s each) can feed `num_gpus` GPUs.

    `facts` (workers, cores, GPU) decide which advice is true for the run; without them, none about workers.
    `loader_busy` is the share of the loader's time its workers spent in stage work (from its stage clocks): near
    1, a loader slower than its stages alone still spends its time in them, so no time is lost between stages.
    """
    if isinstance(consumption, ConsumptionRate):
        unit = unit or consumption.unit
        consumption = consumption.rate
    unit = unit or "items/s"
    if not stage_rates:
        raise ConfigError("judge_pipeline needs at least one stage rate")
    for name, value in stage_rates.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"stage {name!r} has rate {value!r}; rates must be finite and >= 0 items/s")
    if not (math.isfinite(consumption) and consumption > 0):
        raise ConfigError(f"consumption rate must be a positive number of items/s per GPU, got {consumption!r}")
    if num_gpus < 1:
        raise ConfigError(f"num_gpus must be >= 1, got {num_gpus}")

    rates = dict(stage_rates)
    required = consumption * num_gpus
    kinds = {name: stage_kind(name) for name in rates}
    workers = {n: r for n, r in rates.items() if kinds[n] not in _OVERLAPPING and kinds[n] != "loader"}
    overlapping = {n: r for n, r in rates.items() if kinds[n] in _OVERLAPPING}
    whole = {n: r for n, r in rates.items() if kinds[n] == "loader"}
    worker_rate = serial_rate(workers) if workers else None
    # What the stages explain: the workers' serial work or an overlapping stage, whichever is slower.
    explained = {**overlapping, **({"workers": worker_rate} if worker_rate is not None else {})}
    limit = min(explained, key=explained.__getitem__) if explained else None
    if limit == "workers":  # the worker stage that takes the largest share of each item's time
        limit = min(workers, key=workers.__getitem__)
    if whole:
        loader = min(whole, key=whole.__getitem__)
        pipeline_rate = whole[loader]
        glue = bool(explained) and pipeline_rate < _GLUE_LOSS * min(explained.values())
        if limit is None or (glue and (loader_busy is None or loader_busy < _GLUE_LOSS)):
            limit = loader
    else:
        pipeline_rate = min(explained.values())
    assert limit is not None
    kind = kinds[limit]
    keeps_up = pipeline_rate >= required
    below = tuple(n for n, r in rates.items() if r < required)
    if keeps_up:
        lines: tuple[str, ...] = (
            f"Keeps up with {pipeline_rate / required:.1f}x headroom; it would starve beyond "
            f"{pipeline_rate / consumption:.1f} GPUs, first at stage {limit!r}.",)
    else:
        lines = (_shortfall(limit, kind, rates, pipeline_rate, worker_rate, workers, required, num_gpus, unit,
                            loader_busy),
                 *_advice(kind, facts))
    return Verdict(
        stage_rates=rates, consumption_rate=float(consumption), num_gpus=num_gpus, unit=unit,
        pipeline_rate=float(pipeline_rate), required_rate=float(required),
        gpus_feedable=float(pipeline_rate / consumption), keeps_up=keeps_up, bottleneck=limit,
        bottleneck_kind=kind, advice=lines, below_need=below, worker_rate=worker_rate,
    )


def _advice(kind: str | None, facts: RunFacts | None) -> tuple[str, ...]:
    facts = facts or RunFacts()
    if kind is None:
        return ("This stage has no built-in advice: profile it (py-spy, torch.profiler) to see where it spends "
                "time.",)
    stage = "fetch" if kind == "read" and facts.remote else kind
    return advice(stage, facts)


def _shortfall(stage: str, kind: str | None, rates: Mapping[str, float], pipeline_rate: float,
               worker_rate: float | None, workers: Mapping[str, float], required: float, num_gpus: int,
               unit: str, loader_busy: float | None) -> str:
    gpus = f"{num_gpus} GPU" + ("s" if num_gpus > 1 else "")
    need = f"the {required:,.0f} {unit} needed by {gpus}"
    rate = rates[stage]
    if kind == "loader" and rate > 0 and worker_rate:
        return (f"The loader delivers {pipeline_rate:,.0f} {unit} end to end, {required / rate:.1f}x below {need}, "
                f"although its stages one after another explain {worker_rate:,.0f} {unit}: the time is lost "
                "between stages.")
    if rate == 0:
        return f"Stage {stage!r} delivers nothing, so the pipeline cannot feed {gpus}."
    if rate < required:
        text = f"Stage {stage!r} is {required / rate:.1f}x too slow: {rate:,.0f} {unit} against {need}."
        if kind == "decode" and unit.startswith("img"):
            per_core = stage_limits("decode")[0]  # the published per-core JPEG decode range
            text += (f" At {per_core.low:,.0f}-{per_core.high:,.0f} img/s per core (published figure), that "
                     f"takes ~{math.ceil(required / per_core.high)}-{math.ceil(required / per_core.low)} cores "
                     "of decode.")
        return text
    share = worker_rate / rate if stage in workers and worker_rate else 1.0  # its part of the workers' serial time
    if worker_rate is not None and pipeline_rate < _GLUE_LOSS * worker_rate and loader_busy is not None:
        return (f"The pipeline delivers {pipeline_rate:,.0f} {unit}, below {need}, and less than its stages alone "
                f"({worker_rate:,.0f} {unit} one after another); its workers were busy in their stages "
                f"{loader_busy:.0%} of the time, so the stages ran slower inside the loader (cores shared with the "
                f"training process or other jobs). {stage!r} takes {share:.0%} of each item's stage time.")
    return (f"The pipeline delivers {pipeline_rate:,.0f} {unit}, below {need}. No stage alone is below the need "
            f"({rate:,.0f} {unit} for {stage!r}), but each worker runs {', '.join(workers)} one after another "
            f"({worker_rate or 0:,.0f} {unit} together) and {stage!r} takes {share:.0%} of that time.")


def format_table(verdict: Verdict) -> str:
    """Render a verdict as a plain-text table of stages followed by the verdict line and advice."""
    name_width = max(len("stage"), *(len(name) for name in verdict.stage_rates))
    rate_head = f"rate ({verdict.unit})"
    lines = [f"{'stage':<{name_width}}  {rate_head:>16}  {'GPUs fed':>8}"]
    for name, value in verdict.stage_rates.items():
        marks = (["below need"] if name in verdict.below_need else []) + (
            ["bottleneck"] if name == verdict.bottleneck else [])
        mark = f"  <- {', '.join(marks)}" if marks else ""
        lines.append(f"{name:<{name_width}}  {value:>16,.0f}  {value / verdict.consumption_rate:>8.2f}{mark}")
    gpus = f"{verdict.num_gpus} GPU" + ("s" if verdict.num_gpus > 1 else "")
    lines.append(f"need: {verdict.consumption_rate:,.0f} {verdict.unit} per GPU x {gpus} = "
                 f"{verdict.required_rate:,.0f} {verdict.unit}")
    if verdict.worker_rate is not None and len([n for n in verdict.stage_rates
                                                if stage_kind(n) not in _OVERLAPPING | {"loader"}]) > 1:
        lines.append(f"worker stages one after another: {verdict.worker_rate:,.0f} {verdict.unit}")
    state = "KEEPS UP" if verdict.keeps_up else "STARVED"
    lines.append(f"verdict: {state}: the pipeline delivers {verdict.pipeline_rate:,.0f} {verdict.unit}, enough for "
                 f"{verdict.gpus_feedable:.2f} GPUs; bottleneck: {verdict.bottleneck}")
    lines.append("advice:")
    lines.extend(f"  - {line}" for line in verdict.advice)
    return "\n".join(lines)
