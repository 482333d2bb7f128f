"""Published reference figures: how fast GPUs consume data and how fast each input stage can possibly go.

Every number here is somebody else's public figure, tied to their hardware and software, and approximate. They are
used to size a pipeline ("how many cores of JPEG decode does one H100 need?") and to phrase advice; they are never
reported as stoker's own measurements. Sources are named on each entry; see also docs/monitor.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.errors import ConfigError

# Where REFERENCE.md gives a figure without naming who published it, say so rather than invent a source.
_COLLECTED = "public figure, collected in the project's REFERENCE.md"


@dataclass(frozen=True)
class ConsumptionRate:
    """How fast one GPU trains a model, i.e. how fast it eats input, according to a public source."""

    model: str
    gpu: str
    rate: float  # per GPU
    unit: str  # "img/s" or "tokens/s"
    workload: str
    source: str


@dataclass(frozen=True)
class StageLimit:
    """The speed of light of one input stage: a published upper bound, as a (low, high) range."""

    stage: str  # read, decode, h2d: the same kinds verdict.py gives advice for
    what: str
    low: float
    high: float
    unit: str
    source: str


@dataclass(frozen=True)
class PeerFigure:
    """A throughput another data-loading system reports for itself."""

    system: str
    figure: str
    source: str


CONSUMPTION: tuple[ConsumptionRate, ...] = (
    ConsumptionRate("resnet50", "a100", 2_500, "img/s", "ResNet-50, mixed precision, DALI input, 1x A100",
                    "NVIDIA Deep Learning Examples (PyTorch)"),
    ConsumptionRate("resnet50-mlperf", "a100", 3_400, "img/s", "ResNet-50, MLPerf Training v2.0, per A100",
                    "MLPerf Training v2.0 results"),
    ConsumptionRate("resnet50", "h100", 7_000, "img/s",
                    "ResNet-50, MLPerf Training v3.0, per H100 (DGX H100: ~56,000 img/s on 8)",
                    "MLPerf Training v3.0 results"),
    ConsumptionRate("resnet50-ffcv", "a100", 3_000, "img/s", "ResNet-50 trained with FFCV, 1x A100",
                    "FFCV paper/site"),
    ConsumptionRate("resnet18-ffcv", "a100", 10_000, "img/s", "ResNet-18 trained with FFCV, 1x A100",
                    "FFCV paper/site"),
    ConsumptionRate("mpt-1b", "h100", 45_000, "tokens/s", "MPT-1B language model, per H100",
                    "llm-foundry benchmarks"),
    ConsumptionRate("llm-7b", "h100", 10_600, "tokens/s", "7B language model, bf16, per H100",
                    "llm-foundry benchmarks"),
    ConsumptionRate("llm-7b-fp8", "h100", 16_800, "tokens/s", "7B language model, fp8, per H100", "NVIDIA NeMo"),
)

SPEED_OF_LIGHT: tuple[StageLimit, ...] = (
    StageLimit("read", "NVMe SSD sequential read, PCIe 4", 7e9, 7e9, "B/s", _COLLECTED),
    StageLimit("read", "NVMe SSD sequential read, PCIe 5", 12e9, 14e9, "B/s", _COLLECTED),
    StageLimit("read", "S3-like object store, one connection (scales with parallel connections and ranged GETs)",
               85e6, 90e6, "B/s", _COLLECTED),
    StageLimit("decode", "JPEG decode, ImageNet-sized, one CPU core (Pillow ~520-730, simplejpeg ~690-860)",
               500, 850, "img/s", _COLLECTED),
    StageLimit("decode", "Pillow-SIMD decode + resize to 224, one CPU core (Pillow: ~290)", 430, 430, "img/s",
               "REFERENCE.md: measured on the project's machines"),
    StageLimit("h2d", "host-to-device copy from pinned memory, A100 (PCIe 4)", 25e9, 25e9, "B/s",
               _COLLECTED),
    StageLimit("h2d", "host-to-device copy from pinned memory, H100", 35e9, 55e9, "B/s",
               _COLLECTED),
)

PEERS: tuple[PeerFigure, ...] = (
    PeerFigure("FFCV", "~31,000 img/s from RAM (512 px JPEG, 96 cores); ~16,600 img/s from network block storage",
               "FFCV paper/site"),
    PeerFigure("DALI", "~5,000-7,000 img/s per A100 with the hardware JPEG decoder", _COLLECTED),
    PeerFigure("LitData / WebDataset / MosaicML Streaming, ImageNet from S3",
               "5,839 / 3,134 / 2,898 img/s first epoch; 6,692 / 3,924 / 5,099 second", _COLLECTED),
    PeerFigure("torch DataLoader + ImageFolder",
               "~40 img/s per vCPU (FFCV's comparison); ~835 img/s with 4 workers (torchdata example)",
               "FFCV's comparison; a torchdata example"),
)

def consumption_rate(model: str, gpu: str) -> ConsumptionRate:
    """Look up the published consumption rate of `model` on `gpu` (case-insensitive), e.g. ("resnet50", "h100")."""
    key = (model.strip().lower(), gpu.strip().lower())
    for entry in CONSUMPTION:
        if (entry.model, entry.gpu) == key:
            return entry
    known = ", ".join(f"({e.model!r}, {e.gpu!r})" for e in CONSUMPTION)
    raise ConfigError(f"no reference consumption rate for model={model!r} on gpu={gpu!r}; known: {known}")


def stage_limits(stage: str) -> tuple[StageLimit, ...]:
    """Return the speed-of-light entries for one stage kind ("read", "decode" or "h2d"); empty if none."""
    return tuple(limit for limit in SPEED_OF_LIGHT if limit.stage == stage)


def format_references() -> str:
    """Render every reference table as plain text, each figure with its source."""
    lines = ["GPU consumption rates (published, per GPU):"]
    for e in CONSUMPTION:
        lines.append(f"  {e.model:<16} {e.gpu:<5} {e.rate:>9,.0f} {e.unit:<9} {e.workload} [{e.source}]")
    lines.append("Speed of light per stage (published):")
    for s in SPEED_OF_LIGHT:
        span = _human(s.low, s.unit) if s.low == s.high else f"{_human(s.low, s.unit)}-{_human(s.high, s.unit)}"
        lines.append(f"  {s.stage:<7} {span:>15}  {s.what} [{s.source}]")
    lines.append("What peers report:")
    for p in PEERS:
        lines.append(f"  {p.system}: {p.figure} [{p.source}]")
    return "\n".join(lines)


def _human(value: float, unit: str) -> str:
    if unit == "B/s":
        return f"{value / 1e9:g} GB/s" if value >= 1e9 else f"{value / 1e6:g} MB/s"
    return f"{value:,.0f} {unit}"
