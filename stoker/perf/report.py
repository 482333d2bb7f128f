"""What `stoker bench` shows: the stage table with its verdict, a chart of the stage rates, and the machine."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from stoker.perf.monitor_report import pyplot
from stoker.perf.timing import StageResult, usable_cores
from stoker.perf.verdict import Consumption, Verdict, format_table

@dataclass(frozen=True)
class BenchReport:
    """Every stage measurement of one run, the verdict (when a consumption rate was given) and the machine."""

    source: str
    kind: str
    unit: str
    stages: tuple[StageResult, ...]
    consumption: Consumption | None = None
    verdict: Verdict | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what `stoker bench --json` prints)."""
        verdict = None
        if self.verdict is not None:
            v = self.verdict
            verdict = {"keeps_up": v.keeps_up, "bottleneck": v.bottleneck, "bottleneck_kind": v.bottleneck_kind,
                       "pipeline_rate": v.pipeline_rate, "required_rate": v.required_rate,
                       "gpus_feedable": v.gpus_feedable, "below_need": list(v.below_need),
                       "worker_rate": v.worker_rate, "advice": list(v.advice)}
        consumption = None if self.consumption is None else vars(self.consumption)
        return {"source": self.source, "kind": self.kind, "unit": self.unit, "settings": self.settings,
                "machine": self.machine, "stages": [s.to_dict() for s in self.stages],
                "consumption": consumption, "verdict": verdict}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, Python and torch versions: what a benchmark figure depends on."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": usable_cores(), "ram_gib": None if ram is None else round(ram, 1), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def format_bench(report: BenchReport) -> str:
    """The stage table, then the verdict (or how to get one)."""
    s = report.settings
    head = f"stoker bench: {report.source} ({report.kind}"
    if "samples" in s:
        head += f", {s['samples']:,} samples in {s['shards']} {s['format']} shards, {s['bytes'] / 1e6:,.1f} MB"
    head += f"); {s.get('seconds')} s per stage"
    if "workers" in s:
        head += f", {s['workers']} loader workers, batch {s['batch_size']}"
    width = max(len("stage"), *(len(r.name) for r in report.stages))
    lines = [head, f"{'stage':<{width}}  {'rate (' + report.unit + ')':>16}  {'spread':>6}  {'per core':>10}  "
                   f"{'MB/s':>9}  note"]
    for r in report.stages:
        rate = "-" if r.rate is None else f"{r.rate:,.0f}"
        scatter = "-" if r.spread is None else f"{r.spread:.0%}" if r.spread < 10 else ">999%"
        per_core = f"{r.per_lane:,.0f}" if r.per_lane is not None and r.lanes > 1 else "-"
        mbs = "-" if r.bytes_per_s is None else f"{r.bytes_per_s / 1e6:,.1f}"
        lines.append(f"{r.name:<{width}}  {rate:>16}  {scatter:>6}  {per_core:>10}  {mbs:>9}  {r.note}")
    unstable = [r.name for r in report.stages if r.rate is not None and not r.stable]
    if unstable:
        lines.append(f"not stable: {', '.join(unstable)} (see the notes); treat their rates, and a verdict that "
                     "rests on them, as rough")
    if report.verdict is None:
        lines.append("no consumption rate given: add --step-time SECONDS --batch-size N (a measured training step) "
                     "or --model M --gpu G [--gpus N] for a verdict")
    else:
        c = report.consumption
        lines += ["", f"consumption: {c.rate:,.0f} {c.unit} per GPU ({c.source})", format_table(report.verdict)]
    return "\n".join(lines)




def plot_bench(report: BenchReport, path: str) -> None:
    """Save a bar chart of the stage rates against the need to `path` (needs matplotlib).

    A linear axis from 0, each bar labelled with its rate; stages below the need in red, the bottleneck named,
    the need line labelled with its unit, model and GPU count; stages that could not be measured listed.
    """
    plt = pyplot("stoker bench --plot")
    rows = [r for r in report.stages if r.rate is not None]
    absent = [r for r in report.stages if r.rate is None]
    verdict = report.verdict
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 2.6))
    labels, colours = [], []
    for r in rows:
        label = r.name + (" (speed of light)" if r.reference else "")
        if verdict is not None and r.name == verdict.bottleneck:
            label += "  <- bottleneck"
        labels.append(label)
        below = verdict is not None and r.name in verdict.below_need and not r.reference
        colours.append("#bbbbbb" if r.reference else "#cc3311" if below else "#4477aa")
    values = [r.rate for r in rows]
    unstable = [not r.stable for r in rows]
    if verdict is not None and verdict.worker_rate is not None and verdict.worker_rate not in values:
        # what the per-sample stages give when one worker runs them one after another, as the loader does
        labels.append("worker stages in series (derived)")
        values.append(verdict.worker_rate)
        colours.append("#cc3311" if verdict.worker_rate < verdict.required_rate else "#88aacc")
        unstable.append(False)
    ax.barh(labels, values, color=colours)
    ax.invert_yaxis()
    top = max(values + ([verdict.required_rate] if verdict is not None else []), default=1.0)
    ax.set_xlim(0, top * 1.3)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:,.0f}" + ("  (rough)" if unstable[i] else ""), va="center", fontsize=8)
    ax.set_xlabel(f"{report.unit} (linear axis from 0)" + ("; rough: rounds disagreed or too few batches"
                                                            if any(unstable) else ""))
    if verdict is not None and report.consumption is not None:
        c = report.consumption
        gpus = f"{c.num_gpus} GPU" + ("s" if c.num_gpus > 1 else "")
        ax.axvline(verdict.required_rate, color="#228833", linestyle="--",
                   label=f"need: {verdict.required_rate:,.0f} {report.unit} ({c.source.split(' [')[0]}; {gpus})")
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles.append(Patch(color="#cc3311", label=f"below the need ({verdict.required_rate:,.0f} {report.unit})"))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
        state = "keeps up" if verdict.keeps_up else f"STARVED, bottleneck {verdict.bottleneck}"
        ax.set_title(f"stoker bench: {state} (delivers {verdict.pipeline_rate:,.0f} {report.unit}, "
                     f"feeds {verdict.gpus_feedable:.2f} GPUs)", fontsize=10)
    else:
        ax.set_title("stoker bench: stage throughput (no consumption rate given)", fontsize=10)
    if absent:
        ax.annotate("not measured: " + "; ".join(f"{r.name} ({r.note.removeprefix('unavailable: ')})" for r in absent),
                    xy=(0, 0), xycoords="figure fraction", xytext=(6, 6), textcoords="offset points", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.3)
    plt.close(fig)
