"""Decide whether an input pipeline can feed N GPUs, which stage limits it, and what to do about it.

Pure functions over numbers: the caller measures stage rates (e.g. `stoker bench`) and picks a consumption rate,
either measured (`consumption_from_step`) or published (`stoker.perf.reference.consumption_rate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from stoker.errors import ConfigError
from stoker.perf.reference import ConsumptionRate, stage_limits

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

ADVICE: dict[str, tuple[str, ...]] = {
    "read": (
        "Cache the shards on local NVMe (PCIe 4 SSDs read ~7 GB/s) instead of fetching them from remote storage "
        "every epoch.",
        "Read in parallel: more concurrent reads and connections; object stores give ~85-90 MB/s per connection "
        "and scale with parallel connections and ranged GETs.",
    ),
    "decode": (
        "Add loader workers: one CPU core decodes ~500-850 ImageNet-sized JPEGs/s.",
        "Store smaller images: pack with `--max-side` so each sample decodes fewer pixels.",
        "Decode at reduced size (JPEG DCT scaling, e.g. Pillow's draft mode) when the model input is much smaller "
        "than the stored image.",
        "Decode on the GPU (NVIDIA DALI / nvJPEG): DALI reports ~5,000-7,000 img/s per A100.",
    ),
    "augment": (
        "Apply transforms per batch, not per sample: one vectorized op on a batch tensor replaces N Python calls.",
        "Augment on the GPU with Kornia after the host-to-device copy.",
    ),
    "collate": (
        "Do the per-sample work at batch level (stack once, then transform the batch tensor) to cut Python "
        "overhead per sample.",
        "Move batch transforms to the GPU with Kornia, so collate only stacks uint8 tensors.",
    ),
    "h2d": (
        "Use pin_memory=True and .to(device, non_blocking=True): pinned copies run at ~25 GB/s (A100) to "
        "~35-55 GB/s (H100) and overlap with compute.",
        "Copy uint8 and convert/normalize on the GPU: 4x fewer bytes than float32.",
    ),
    "loader": (
        "Every measured stage is faster than the loader end to end, so the time goes between stages: worker IPC, "
        "per-sample Python overhead, or too little parallelism. Raise num_workers and prefetch_factor and batch "
        "inside the workers.",
    ),
}

_UNKNOWN_ADVICE = ("This stage has no built-in advice: profile it (py-spy, torch.profiler) to see where it spends "
                   "time.",)

# An end-to-end rate below this fraction of "every stage run back to back" means time is lost outside the stages.
_GLUE_LOSS = 0.8


@dataclass(frozen=True)
class Verdict:
    """The answer to "can this pipeline feed these GPUs?", with the numbers behind it."""

    stage_rates: Mapping[str, float]
    consumption_rate: float  # items/s one GPU consumes
    num_gpus: int
    unit: str
    pipeline_rate: float  # items/s the whole pipeline delivers: its slowest stage
    required_rate: float  # consumption_rate * num_gpus
    gpus_feedable: float  # pipeline_rate / consumption_rate; may be fractional
    keeps_up: bool
    bottleneck: str  # name of the limiting stage
    bottleneck_kind: str | None  # read, decode, augment, collate, h2d, loader, or None if unrecognized
    advice: tuple[str, ...]


def stage_kind(stage: str) -> str | None:
    """Map a stage name such as "jpeg_decode" or "h2d" to a kind that has advice, or None."""
    name = stage.lower()
    for kind, words in _KIND_KEYWORDS:
        if any(word in name for word in words):
            return kind
    return None


def advice_for(stage: str) -> tuple[str, ...]:
    """Return the generic advice for a stage name (see ADVICE), or a suggestion to profile it."""
    kind = stage_kind(stage)
    return ADVICE.get(kind, _UNKNOWN_ADVICE) if kind else _UNKNOWN_ADVICE


def consumption_from_step(seconds_per_step: float, items_per_step: float) -> float:
    """Return the items/s one GPU consumes when a step of `items_per_step` items takes `seconds_per_step`."""
    if not seconds_per_step > 0 or not items_per_step > 0:
        raise ConfigError(f"need a positive step time and batch size, got {seconds_per_step} s and {items_per_step}")
    return items_per_step / seconds_per_step


def judge_pipeline(
    stage_rates: Mapping[str, float],
    consumption: float | ConsumptionRate,
    num_gpus: int = 1,
    *,
    unit: str | None = None,
) -> Verdict:
    """Judge whether stages running at `stage_rates` (items/s each) can feed `num_gpus` GPUs.

    Stages are assumed to overlap (pipelined), so the pipeline delivers its slowest stage's rate. A stage whose
    name reads as end-to-end ("loader", "e2e", "total") is the measured whole; if it falls well below even running
    every other stage back to back, the bottleneck is the glue between stages and it is named instead.
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
    pipeline_rate = min(rates.values())
    required = consumption * num_gpus
    bottleneck = _bottleneck(rates)
    kind = stage_kind(bottleneck)
    keeps_up = pipeline_rate >= required
    if keeps_up:
        headroom = pipeline_rate / required
        advice: tuple[str, ...] = (
            f"Keeps up with {headroom:.1f}x headroom; it would starve beyond "
            f"{pipeline_rate / consumption:.1f} GPUs, first at stage {bottleneck!r}.",
        )
    else:
        advice = (_shortfall(bottleneck, kind, rates[bottleneck], required, num_gpus, unit), *advice_for(bottleneck))
    return Verdict(
        stage_rates=rates,
        consumption_rate=float(consumption),
        num_gpus=num_gpus,
        unit=unit,
        pipeline_rate=float(pipeline_rate),
        required_rate=float(required),
        gpus_feedable=float(pipeline_rate / consumption),
        keeps_up=keeps_up,
        bottleneck=bottleneck,
        bottleneck_kind=kind,
        advice=advice,
    )


def _bottleneck(rates: dict[str, float]) -> str:
    parts = {name: r for name, r in rates.items() if stage_kind(name) != "loader"}
    whole = {name: r for name, r in rates.items() if stage_kind(name) == "loader"}
    if not parts:
        return min(whole, key=whole.__getitem__)
    slowest_part = min(parts, key=parts.__getitem__)
    if not whole:
        return slowest_part
    slowest_whole = min(whole, key=whole.__getitem__)
    # If every stage ran one after another in a single lane, the whole would still reach 1 / sum(1 / rate).
    back_to_back = 0.0 if 0 in parts.values() else 1.0 / sum(1.0 / r for r in parts.values())
    return slowest_whole if whole[slowest_whole] < _GLUE_LOSS * back_to_back else slowest_part


def _shortfall(stage: str, kind: str | None, rate: float, required: float, num_gpus: int, unit: str) -> str:
    gpus = f"{num_gpus} GPU" + ("s" if num_gpus > 1 else "")
    short = "delivers nothing" if rate == 0 else f"is {required / rate:.1f}x too slow"
    text = f"Stage {stage!r} {short}: {rate:,.0f} {unit} against the {required:,.0f} {unit} needed by {gpus}."
    if kind == "decode" and unit.startswith("img"):
        per_core = stage_limits("decode")[0]  # the published per-core JPEG decode range
        text += (f" At {per_core.low:,.0f}-{per_core.high:,.0f} img/s per core (published figure), that takes "
                 f"~{math.ceil(required / per_core.high)}-{math.ceil(required / per_core.low)} cores of decode.")
    return text


def format_table(verdict: Verdict) -> str:
    """Render a verdict as a plain-text table of stages followed by the verdict line and advice."""
    name_width = max(len("stage"), *(len(name) for name in verdict.stage_rates))
    rate_head = f"rate ({verdict.unit})"
    lines = [f"{'stage':<{name_width}}  {rate_head:>16}  {'GPUs fed':>8}"]
    for name, value in verdict.stage_rates.items():
        mark = "  <- bottleneck" if name == verdict.bottleneck else ""
        lines.append(f"{name:<{name_width}}  {value:>16,.0f}  {value / verdict.consumption_rate:>8.2f}{mark}")
    gpus = f"{verdict.num_gpus} GPU" + ("s" if verdict.num_gpus > 1 else "")
    lines.append(f"need: {verdict.consumption_rate:,.0f} {verdict.unit} per GPU x {gpus} = "
                 f"{verdict.required_rate:,.0f} {verdict.unit}")
    state = "KEEPS UP" if verdict.keeps_up else "STARVED"
    lines.append(f"verdict: {state}: the pipeline delivers {verdict.pipeline_rate:,.0f} {verdict.unit}, enough for "
                 f"{verdict.gpus_feedable:.2f} GPUs; bottleneck: {verdict.bottleneck}")
    lines.append("advice:")
    lines.extend(f"  - {line}" for line in verdict.advice)
    return "\n".join(lines)
