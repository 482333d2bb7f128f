"""Several real torch.distributed ranks (gloo, 127.0.0.1) on one machine, for tests."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from stoker.testing import free_port


def _rank_entry(fn: Callable[..., None], rank: int, world: int, port: int, args: tuple[Any, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(fn: Callable[..., None], world: int, *args: Any, timeout: float = 90.0) -> None:
    """Run fn(rank, *args) in `world` processes of one gloo group; fail unless all exit cleanly within `timeout`."""
    port = free_port()
    ctx = multiprocessing.get_context("fork")  # ranks inherit the imported torch: no seconds-long re-import
    procs = [ctx.Process(target=_rank_entry, args=(fn, rank, world, port, args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks did not finish within {timeout:.0f} s"
    assert [p.exitcode for p in procs] == [0] * world
