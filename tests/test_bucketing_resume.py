"""stoker.DataLoader checkpoints a BucketedStream iterated in real worker processes: stop after k batches, save
`loader.state_dict()`, build everything again, load it, and the rest is exactly the batches the uninterrupted epoch
delivered after k (same samples, same order, none twice, none lost); checkpoints that do not fit are refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from _distributed import run_gloo_ranks
from stoker import DataLoader, StreamingDataset
from stoker.bucketing.bucketed import BucketedStream
from stoker.errors import StateError
from stoker.synthetic import make_dataset

ROWS = (60, 45, 45)  # 150 text samples


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("txt"), rows=ROWS, kind="text", fmt="msgpack")


def keys(batch):
    """The collate_fn of these tests: a batch as the keys of its samples, in order."""
    return [str(sample["key"]) for sample in batch]


def bucketed(root, *, buffer_size=32, dataset_seed=1):
    return BucketedStream(StreamingDataset(root, seed=dataset_seed, shuffle_buffer=50), max_tokens=300,
                          buffer_size=buffer_size, seed=2)


def loader(root, workers, persistent=False, **stream):
    return DataLoader(bucketed(root, **stream), batch_size=None, collate_fn=keys, num_workers=workers,
                      persistent_workers=persistent)


def stop_after(loader, k):
    """The first k batches of a pass, then the checkpoint a training loop would save (through pickle, as torch.save)."""
    it = iter(loader)
    head = [next(it) for _ in range(k)]
    return head, pickle.loads(pickle.dumps(loader.state_dict()))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_after_k_batches_delivers_exactly_the_rest_of_the_epoch(text, workers):
    full = list(loader(text, workers))
    assert sorted(k for batch in full for k in batch) == sorted(f"{i:06d}" for i in range(sum(ROWS)))
    for k in (0, 1, 7, len(full) - 1):
        head, state = stop_after(loader(text, workers), k)
        resumed = loader(text, workers)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert head + rest == full, f"{workers} workers, stopped after {k} of {len(full)} batches"


def test_a_resumed_loader_with_persistent_workers_continues_and_then_starts_the_next_epoch(text):
    full = list(loader(text, 2))
    head, state = stop_after(loader(text, 2, persistent=True), 5)
    resumed = loader(text, 2, persistent=True)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    # The pass ran to its end: the loader moved the stream to epoch 1, which the persistent workers see.
    assert resumed.state_dict()["epoch"] == 1 and resumed.dataset.epoch == 1
    second = list(resumed)
    fresh = loader(text, 2)
    fresh.dataset.set_epoch(1)
    assert second == list(fresh) != full


def test_an_uninterrupted_pass_is_torchs_own_order(text):
    # stoker.DataLoader delivers the workers' batches round robin, exactly as torch's DataLoader does.
    plain = torch.utils.data.DataLoader(bucketed(text), batch_size=None, collate_fn=keys, num_workers=2)
    assert list(loader(text, 2)) == list(plain)


def test_a_plain_list_split_among_workers_resumes_exactly():
    rng = np.random.default_rng(0)
    items = [{"key": str(i), "tokens": np.ones(int(n), np.uint16)} for i, n in enumerate(rng.integers(1, 60, 150))]

    def make():
        return DataLoader(BucketedStream(items, batch_size=6, buffer_size=20, seed=5), batch_size=None,
                          collate_fn=keys, num_workers=2)

    full = list(make())
    head, state = stop_after(make(), 9)
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


@pytest.mark.parametrize(("change", "match"), [
    ({"workers": 1}, r"num_workers \(checkpoint 2, now 1\)"),
    ({"buffer_size": 64}, r"buffer_size"),
    ({"dataset_seed": 9}, r"differing keys dataset"),
])
def test_a_checkpoint_of_other_settings_is_refused_naming_them(text, change, match):
    _, state = stop_after(loader(text, 2), 3)
    workers = change.pop("workers", 2)
    with pytest.raises(StateError, match=match):
        loader(text, workers, **change).load_state_dict(state)


def test_a_checkpoint_that_is_not_one_is_refused(text):
    with pytest.raises(StateError, match="DataLoader checkpoint lacks keys"):
        loader(text, 2).load_state_dict({"epoch": 0, "consumed": 12})
    _, state = stop_after(loader(text, 2), 3)
    state["workers"] = state["workers"][:1]
    with pytest.raises(StateError, match="expected a list of 2 entries"):
        loader(text, 2).load_state_dict(state)


def _rank_main(rank: int, root: str, out: str, job: dict) -> None:
    torch.set_num_threads(1)
    ranked = loader(root, 2)
    if "states" in job:
        ranked.load_state_dict(job["states"][rank])
    batches = []
    for batch in ranked:
        batches.append(batch)
        if len(batches) == job.get("stop_after"):
            break
    result = {"batches": batches, "state": ranked.state_dict()}
    if "states" in job:  # another rank's checkpoint does not fit this rank
        try:
            loader(root, 2).load_state_dict(job["states"][1 - rank])
        except StateError as exc:
            result["refused"] = str(exc)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(root, out: Path, job: dict) -> list[dict]:
    out.mkdir()
    run_gloo_ranks(_rank_main, 2, root, str(out), job)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_gloo_ranks_with_two_workers_each_resume_their_own_share_exactly(text, tmp_path):
    full = run_ranks(text, tmp_path / "full", {})
    first = run_ranks(text, tmp_path / "first", {"stop_after": 4})
    rest = run_ranks(text, tmp_path / "rest", {"states": [r["state"] for r in first]})
    for rank in range(2):
        assert first[rank]["batches"] + rest[rank]["batches"] == full[rank]["batches"], f"rank {rank}"
        assert "rank (checkpoint" in rest[rank]["refused"]
    delivered = [k for r in full for batch in r["batches"] for k in batch]
    assert sorted(delivered) == sorted(f"{i:06d}" for i in range(sum(ROWS)))  # the ranks share no sample


def test_set_epoch_to_another_epoch_after_loading_discards_the_checkpoint(text):
    _, state = stop_after(loader(text, 2), 3)
    resumed = loader(text, 2)
    resumed.load_state_dict(state)
    resumed.dataset.set_epoch(1)
    fresh = loader(text, 2)
    fresh.dataset.set_epoch(1)
    assert list(resumed) == list(fresh)
