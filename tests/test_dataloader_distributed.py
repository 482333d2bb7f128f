"""Real torch.distributed gloo ranks on one machine, each with real DataLoader workers."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from stoker.synthetic import make_dataset
from stoker.testing import free_port
from stoker import DataLoader, StreamingDataset

ALL = [f"{i:06d}" for i in range(130)]


def _rank_main(rank, world, port, root, out, job):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        ds = StreamingDataset(root, shuffle_buffer=30, seed=1)
        cls = torch.utils.data.DataLoader if job.get("plain") else DataLoader
        loader = cls(ds, batch_size=job["batch_size"], num_workers=job["workers"], drop_last=job["drop_last"],
                     multiprocessing_context=job.get("context"))
        result = {"len": len(loader), "epochs": []}
        if "state" in job:
            loader.load_state_dict(job["state"])
            result["len"] = len(loader)
        for _ in range(job["epochs"]):
            keys = []
            for i, batch in enumerate(loader):
                keys += batch["key"]
                if job.get("sync"):
                    dist.all_reduce(torch.ones(1))  # one collective per step, as DDP does: unequal batches would hang
                if i + 1 == job.get("stop_after"):
                    result["state"] = loader.state_dict()
                    break
            result["epochs"].append(keys)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world, root, tmp_path, job, start_method="fork"):
    out = tmp_path / f"out-{world}-{start_method}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    tmp.start_processes(_rank_main, args=(world, free_port(), root, str(out), job), nprocs=world,
                        start_method=start_method, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dist"), rows=(30, 40, 25, 35))


@pytest.mark.slow
def test_exactly_once_over_three_ranks_with_two_workers_each(root, tmp_path):
    results = run_ranks(3, root, tmp_path, {"batch_size": 8, "workers": 2, "drop_last": False, "epochs": 2})
    for epoch in range(2):
        parts = [r["epochs"][epoch] for r in results]
        assert sorted(sum(parts, [])) == ALL
    assert results[0]["epochs"][0] != results[0]["epochs"][1]  # a new order each epoch
    assert [r["len"] for r in results] == [6, 6, 5]  # 17 batches of 8 (the last one of 2) over 3 ranks


@pytest.mark.slow
def test_drop_last_gives_equal_batches_so_collectives_never_hang(root, tmp_path):
    results = run_ranks(3, root, tmp_path, {"batch_size": 8, "workers": 2, "drop_last": True, "epochs": 1, "sync": True})
    counts = [len(r["epochs"][0]) for r in results]
    assert counts == [40, 40, 40] and [r["len"] for r in results] == [5, 5, 5]
    delivered = sum((r["epochs"][0] for r in results), [])
    assert len(set(delivered)) == 120 and set(delivered) <= set(ALL)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_three(root, tmp_path):
    first = run_ranks(2, root, tmp_path, {"batch_size": 6, "workers": 2, "drop_last": False, "epochs": 1, "stop_after": 4})
    state = first[0]["state"]
    assert state["consumed"] == 48 and first[1]["state"] == state  # every rank writes the same checkpoint
    rest = run_ranks(3, root, tmp_path, {"batch_size": 5, "workers": 1, "drop_last": False, "epochs": 1, "state": state})
    delivered = sum((r["epochs"][0] for r in first), []) + sum((r["epochs"][0] for r in rest), [])
    assert sorted(delivered) == ALL


@pytest.mark.slow
def test_spawned_workers_of_a_plain_torch_loader_get_the_rank_captured_in_the_rank(root, tmp_path):
    """Spawned workers cannot see the process group: the dataset takes the rank along when it is pickled."""
    results = run_ranks(2, root, tmp_path, {"batch_size": 10, "workers": 1, "drop_last": False, "epochs": 1,
                                            "context": "spawn", "plain": True})
    parts = [r["epochs"][0] for r in results]
    assert sorted(parts[0] + parts[1]) == ALL and not set(parts[0]) & set(parts[1])
