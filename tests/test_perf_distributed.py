"""Aggregation across two real torch.distributed (gloo) ranks, one of them with a slow loader."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from _distributed import run_gloo_ranks
from stoker.perf.monitor import monitor


def _rank_main(rank: int, out: str) -> None:
    delay = 0.03 if rank == 1 else 0.0  # rank 1's loader cannot keep up

    def loader():
        for _ in range(12):
            time.sleep(delay)
            yield torch.zeros(4, 2)

    lines: list[str] = []
    with monitor(loader(), log=lines.append, log_every=0, csv_path=f"{out}/rank{{rank}}.csv") as m:
        for _ in m:
            time.sleep(0.005)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"report": m.last_report, "lines": lines}))


def test_two_ranks_report_names_the_slow_one(tmp_path) -> None:
    run_gloo_ranks(_rank_main, 2, str(tmp_path))

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:  # every rank gets the aggregated numbers
        report = result["report"]
        assert report["world_size"] == 2 and report["scope"] == "all ranks"
        assert report["slowest_rank"] == 1
        assert [r["rank"] for r in report["ranks"]] == [0, 1]
        assert [r["steps"] for r in report["ranks"]] == [12, 12]
        assert report["ranks"][1]["data_wait_fraction"] > 0.5 > report["ranks"][0]["data_wait_fraction"]
        assert report["starving"] is True  # the job is as starved as its slowest rank
        assert report["samples_per_s"] == pytest.approx(sum(r["samples_per_s"] for r in report["ranks"]))

    # the all-ranks report is logged once, by rank 0, and names rank 1
    rank0_text = "\n".join(results[0]["lines"])
    assert "on 2 ranks" in rank0_text and "STARVING" in rank0_text and "on rank 1, the slowest" in rank0_text
    assert not any("on 2 ranks" in line for line in results[1]["lines"])
    # "{rank}" in csv_path gives each rank its own file
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(row["rank"] == str(rank) for row in rows)
