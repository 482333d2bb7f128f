"""What `stoker.monitor` shows: the report as text, and a PNG of where each rank's step time went."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any

from stoker.errors import MissingExtraError


def format_report(report: Mapping[str, Any]) -> str:
    """Render a `Monitor.report()` dict as a few lines of text."""
    local, ranks = report["local"], report["ranks"]
    elapsed = max(r["wait_s"] + r["compute_s"] for r in ranks)
    steps = max(r["steps"] for r in ranks)
    where = f" on {len(ranks)} ranks" if len(ranks) > 1 else ""
    if report["scope"] != "all ranks":
        where = f" ({report['scope']})"
    slow = next(r for r in ranks if r["rank"] == report["slowest_rank"])
    lines = [f"stoker.monitor report: {steps} steps in {elapsed:.1f} s{where}",
             f"  verdict      {report['headline']} (threshold {local['starve_threshold']:.0%}, steady state only)"]
    steady = _steps(slow["steady_steps"])
    if slow["steady_steps"] > 0 and not math.isnan(slow["steady_data_wait_fraction"]):
        steady += f", data wait {slow['steady_data_wait_fraction']:.1%} of step time"
    if len(ranks) > 1:
        steady += f" on rank {slow['rank']}, the slowest"
        means = [r["steady_data_wait_fraction"] for r in ranks if not math.isnan(r["steady_data_wait_fraction"])]
        if means:
            steady += f"; mean over ranks {sum(means) / len(means):.1%}"
    lines.append(f"  steady state {steady}")
    first = slow["first_batch_s"]
    first_text = "-" if math.isnan(first) else f"{first:.2f} s" if first >= 1 else f"{first * 1e3:.1f} ms"
    lines.append(f"  start-up     {_steps(slow['startup_steps'])} (first batches of each pass and after worker "
                 f"restarts), waited {slow['startup_wait_s']:.2f} s; first batch {first_text}; "
                 "not counted in the verdict")
    if slow.get("restarts"):
        lines.append(f"  restarts     {slow['restarts']} worker restart{'s' if slow['restarts'] != 1 else ''} "
                     f"(re-deals, new passes without persistent workers): {_steps(slow['restart_steps'])} after "
                     f"them waited {slow['restart_wait_s']:.2f} s; part of start-up, not counted in the verdict")
    throughput = f"{report['steps_per_s']:.1f} steps/s"
    if report["samples_per_s"] is not None:
        throughput += f", {report['samples_per_s']:,.0f} samples/s" + (" over all ranks" if len(ranks) > 1 else "")
    if local["samples_per_s_if_fed"] is not None and len(ranks) == 1:
        throughput += f" ({local['samples_per_s_if_fed']:,.0f} if data were free)"
    lines.append(f"  throughput   {throughput}")
    here = f"rank {local['rank']}: " if len(ranks) > 1 else ""
    lines.append(f"  step time    {here}steady p50 {local['step_ms_p50']:.1f} ms; data wait p50 "
                 f"{local['wait_ms_p50']:.1f} ms, p90 {local['wait_ms_p90']:.1f} ms")
    if len(ranks) > 1:
        for r in ranks:
            per_step = 1e3 * r["steady_wait_s"] / r["steady_steps"] if r["steady_steps"] > 0 else math.nan
            lines.append(f"  rank {r['rank']:<7} {r['state']}; waits {per_step:.1f} ms per steady step for data"
                         + (f"; slowest stage {r['stage']}" if r.get("stage") else ""))
    costs = slow.get("stage_ms_per_batch") or {}
    if costs:
        ordered = sorted(costs.items(), key=lambda kv: -kv[1])
        lines.append("  loader       " + (f"rank {slow['rank']}: " if len(ranks) > 1 else "")
                     + "ms per batch by stage (worker stages divided by the workers): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in ordered))
    lines.append(f"  bottleneck   {report['bottleneck']}"
                 + (f": {report['bottleneck_stage']}" if report.get("bottleneck_stage") else ""))
    lines.extend(f"  advice       {line}" for line in report["advice"])
    if report.get("tuning") is not None:  # an autotuned stoker.DataLoader: what it chose and why
        lines.extend("  " + line for line in report["tuning"]["summary"].splitlines())
    return "\n".join(lines)


def plot_ranks(ranks: Sequence[Mapping[str, Any]], path: str | None, title: str = "") -> None:
    """Save stacked bars of each rank's time per steady step (data wait, compute, loader stages) to `path`.

    With `path` None only checks that matplotlib is installed.
    """
    plt = pyplot("monitor(plot=...)")
    if path is None:
        return
    stages = sorted({s for r in ranks for s in r.get("stage_ms_per_batch", {})})
    names = [f"rank {r['rank']}" for r in ranks]
    fig, (ax_step, ax_stage) = plt.subplots(1, 2, figsize=(11, 0.6 * len(ranks) + 2.4))
    wait = [_per_step(r, "steady_wait_s") for r in ranks]
    compute = [_per_step(r, "steady_compute_s") for r in ranks]
    ax_step.barh(names, wait, color="#cc3311", label="waiting for data")
    ax_step.barh(names, compute, left=wait, color="#4477aa", label="compute")
    for i, (w, c) in enumerate(zip(wait, compute)):
        ax_step.text(w + c, i, f" {w:.1f} + {c:.1f} ms", va="center", fontsize=8)
    ax_step.set_xlim(0, max((w + c for w, c in zip(wait, compute)), default=1) * 1.35 or 1)
    ax_step.set_xlabel("ms per steady step (axis from 0)")
    ax_step.set_title("training process: wait vs compute")
    ax_step.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax_step.invert_yaxis()
    left = [0.0] * len(ranks)
    palette = ["#ee7733", "#009988", "#33bbee", "#ee3377", "#bbbbbb", "#0077bb", "#aa3377", "#117733"]
    for i, stage in enumerate(stages):
        values = [r.get("stage_ms_per_batch", {}).get(stage, 0.0) for r in ranks]
        ax_stage.barh(names, values, left=left, color=palette[i % len(palette)], label=stage)
        left = [a + b for a, b in zip(left, values)]
    for i, total in enumerate(left):
        ax_stage.text(total, i, f" {total:.1f} ms", va="center", fontsize=8)
    ax_stage.set_xlim(0, max(left, default=1) * 1.3 or 1)
    ax_stage.set_xlabel("loader ms per batch by stage (axis from 0; worker stages / workers)")
    ax_stage.set_title("loader stages" if stages else "loader stages: not reported by this loader")
    if stages:
        ax_stage.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, fontsize=8, frameon=False)
    ax_stage.invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.3)
    plt.close(fig)


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def _per_step(row: Mapping[str, Any], key: str) -> float:
    return 1e3 * row[key] / row["steady_steps"] if row["steady_steps"] > 0 else 0.0


def pyplot(feature: str) -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or MissingExtraError naming `feature` and the extra."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError(feature, "plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt
