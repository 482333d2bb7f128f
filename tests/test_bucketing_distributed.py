"""Two real torch.distributed (gloo) ranks: the samplers take rank and world from the process group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

from _distributed import run_gloo_ranks
from stoker.bucketing.samplers import BucketBatchSampler, TokenBudgetBatchSampler

LENGTHS = np.random.default_rng(0).integers(1, 300, 501)


def _rank_main(rank: int, out: str) -> None:
    # Misleading env vars: an initialised process group must take precedence over them.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "3", "5"
    samplers = {
        "token": TokenBudgetBatchSampler(LENGTHS, 1024, seed=7),
        "bucket": BucketBatchSampler(LENGTHS, 8, seed=7),
    }
    result = {name: {"rank": s.rank, "world": s.num_replicas, "batches": list(s)} for name, s in samplers.items()}
    for name in samplers:
        counts = [None, None]
        dist.all_gather_object(counts, len(result[name]["batches"]))  # the ranks agree on the count
        result[name]["gathered_counts"] = counts
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_gloo_ranks_get_disjoint_equal_batches(tmp_path) -> None:
    run_gloo_ranks(_rank_main, 2, str(tmp_path))

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("token", "bucket"):
        assert [(r[name]["rank"], r[name]["world"]) for r in results] == [(0, 2), (1, 2)]
        per_rank = [[i for b in r[name]["batches"] for i in b] for r in results]
        assert len(results[0][name]["batches"]) == len(results[1][name]["batches"]) > 0
        assert not set(per_rank[0]) & set(per_rank[1]), "ranks share no sample"
        assert sorted(per_rank[0] + per_rank[1]) == list(range(len(LENGTHS))), "every sample once"
        # Exactly what the sampler gives when told its rank and world explicitly, for both samplers.
        assert [r[name]["batches"] for r in results] == [list(EXPLICIT[name](r)) for r in range(2)]
        assert results[0][name]["gathered_counts"] == results[1][name]["gathered_counts"] == \
            [len(results[0][name]["batches"])] * 2

EXPLICIT = {
    "token": lambda rank: TokenBudgetBatchSampler(LENGTHS, 1024, seed=7, num_replicas=2, rank=rank),
    "bucket": lambda rank: BucketBatchSampler(LENGTHS, 8, seed=7, num_replicas=2, rank=rank),
}
