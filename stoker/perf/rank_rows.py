"""The per-rank numbers of a monitor report: one float vector per rank for all_gather, and the row built from it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stoker.clock import STAGES
from stoker.perf import diagnosis
from stoker.perf.diagnosis import Phase
from stoker.perf.stats import rate

# Per-rank numbers exchanged with one all_gather of a float64 tensor, in this order, then one per stage of STAGES
# (NaN for a stage that did not run).
GATHERED = ("steps", "samples", "wait_s", "compute_s", "first_batch_s", "step_ms_p50", "wait_ms_p50", "wait_ms_p90",
            "startup_steps", "startup_wait_s", "startup_compute_s", "restarts", "restart_steps", "restart_wait_s",
            "num_workers", "has_stage_times", "backend")


def phase_dict(phase: Phase) -> dict[str, Any]:
    """A phase as plain data, with its data-wait fraction."""
    return {"steps": phase.steps, "wait_s": phase.wait_s, "compute_s": phase.compute_s,
            "data_wait_fraction": phase.fraction}


def wait_per_step(row: Mapping[str, Any]) -> float:
    """Steady data wait per step of a rank row: under DDP the slowest rank has the most."""
    if row["steady_steps"] > 0:
        return row["steady_wait_s"] / row["steady_steps"]
    return row["wait_s"] / max(row["steps"], 1) - 1e9  # ranks without a steady state come last


def gathered_values(local: Mapping[str, Any]) -> list[float]:
    """This rank's metrics as the vector all ranks exchange: GATHERED, then one value per stage of STAGES."""
    flat = {**local, "startup_steps": local["startup"]["steps"], "startup_wait_s": local["startup"]["wait_s"],
            "startup_compute_s": local["startup"]["compute_s"], "restarts": local["restarts"]["count"],
            "restart_steps": local["restarts"]["steps"], "restart_wait_s": local["restarts"]["wait_s"],
            "num_workers": local["num_workers"] if local["num_workers"] is not None else math.nan,
            "has_stage_times": float(bool(local["stage_seconds"])),
            "backend": float(diagnosis.BACKENDS.index(local["backend"])) if local["backend"] else math.nan}
    values = [math.nan if flat[key] is None else float(flat[key]) for key in GATHERED]
    return values + [float(local["stage_seconds"].get(name, math.nan)) for name in STAGES]


def rank_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """Per-rank summary from the gathered numbers (or from local metrics)."""
    if "startup" in values:  # local metrics: the same fields as one all_gather row
        values = {**values, **dict(zip(GATHERED, gathered_values(values)))}
    row = {key: values[key] for key in GATHERED}
    row["samples"] = math.nan if row["samples"] is None else row["samples"]
    row["rank"] = int(values["rank"])
    row["steps"] = int(row["steps"])
    row["startup_steps"] = int(row["startup_steps"])
    row["restarts"] = int(row["restarts"])
    row["restart_steps"] = int(row["restart_steps"])
    row["num_workers"] = None if math.isnan(row["num_workers"]) else int(row["num_workers"])
    row["has_stage_times"] = bool(row["has_stage_times"])
    row["backend"] = None if math.isnan(row["backend"]) else diagnosis.BACKENDS[int(row["backend"])]
    row["stage_seconds"] = dict(values["stage_seconds"])
    elapsed = row["wait_s"] + row["compute_s"]
    row["data_wait_fraction"] = row["wait_s"] / elapsed if elapsed > 0 and row["steps"] else math.nan
    row["steady_steps"] = row["steps"] - row["startup_steps"]
    row["steady_wait_s"] = row["wait_s"] - row["startup_wait_s"]
    row["steady_compute_s"] = row["compute_s"] - row["startup_compute_s"]
    row["steady_data_wait_fraction"] = Phase(row["steady_steps"], row["steady_wait_s"],
                                             row["steady_compute_s"]).fraction
    row["steps_per_s"] = rate(row["steps"], elapsed)
    row["samples_per_s"] = rate(row["samples"], elapsed)
    return row


def from_gathered(rank: int, numbers: list[float]) -> dict[str, Any]:
    """The row of `rank` from the vector it sent (`gathered_values`)."""
    row: dict[str, Any] = dict(zip(GATHERED, numbers))
    row["rank"] = rank
    row["stage_seconds"] = {name: v for name, v in zip(STAGES, numbers[len(GATHERED):]) if not math.isnan(v)}
    return rank_row(row)
