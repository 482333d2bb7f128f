"""Aggregation across two real torch.distributed (gloo) ranks, one of them with a slow loader."""

from __future__ import annotations

import csv
import json
import multiprocessing
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stoker.perf.monitor import monitor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
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
    finally:
        dist.destroy_process_group()


def test_two_ranks_report_names_the_slow_one(tmp_path) -> None:
    port = _free_port()
    # fork: the ranks inherit the imported torch instead of paying seconds to import it again
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks did not finish within 90 s"
    assert [p.exitcode for p in procs] == [0, 0]

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
    assert "on 2 ranks" in rank0_text and "slowest rank 1" in rank0_text
    assert not any("on 2 ranks" in line for line in results[1]["lines"])
    # "{rank}" in csv_path gives each rank its own file
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(row["rank"] == str(rank) for row in rows)
