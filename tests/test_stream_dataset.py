"""StreamingDataset and ShardDataset in one process: contents, order, partitioning, checkpoints, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stoker.synthetic import make_dataset
from stoker import ShardDataset, StreamingDataset
from stoker.errors import ConfigError, ShardError, StateError

ALL = [f"{i:06d}" for i in range(145)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("img"), rows=(40, 35, 0, 40, 30))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("txt"), rows=(20, 33), kind="text", fmt="msgpack")


def keys(ds):
    return [s["key"] for s in ds]


def test_image_samples_are_complete_and_intact(images):
    samples = list(StreamingDataset(images, shuffle_buffer=32))
    assert sorted(s["key"] for s in samples) == ALL
    for s in samples:
        assert set(s) == {"key", "label", "image", "height", "width"}
        assert isinstance(s["image"], bytes) and s["image"][:6].decode() == s["key"]
        assert s["label"] == int(s["key"]) % 10 and s["height"] == (len(s["image"]) - 6) % 97 + 1


def test_text_samples_from_msgpack_shards(texts):
    samples = list(StreamingDataset(texts, shuffle_buffer=8))
    assert sorted(s["key"] for s in samples) == ALL[:53]
    for s in samples:
        assert s["tokens"].dtype == np.uint16 and len(s["tokens"]) == s["length"]
        assert np.all(s["tokens"] == int(s["key"]))


def test_columns_transform_and_unknown_columns(images):
    ds = StreamingDataset(images, columns=["label", "key"], transform=lambda s: (s["key"], s["label"]))
    got = list(ds)
    assert sorted(k for k, _ in got) == ALL and all(label == int(k) % 10 for k, label in got)
    with pytest.raises(ConfigError, match="nope"):
        StreamingDataset(images, columns=["key", "nope"])


def test_transform_errors_name_the_sample_and_shard(images):
    def bad(sample):
        raise ValueError("cannot decode")

    with pytest.raises(ValueError, match="cannot decode") as info:
        next(iter(StreamingDataset(images, shuffle=False, transform=bad)))
    assert "sample '000000' from shard shard-00000.arrow" in "\n".join(info.value.__notes__)


def test_order_per_seed_and_epoch(images):
    a, b = StreamingDataset(images, seed=5, shuffle_buffer=50), StreamingDataset(images, seed=5, shuffle_buffer=50)
    first = keys(a)
    assert first == keys(b) and first != sorted(first)
    a.set_epoch(1)
    second = keys(a)
    assert second != first and sorted(second) == ALL
    assert keys(StreamingDataset(images, seed=6, shuffle_buffer=50)) != first
    assert keys(StreamingDataset(images, shuffle=False)) == ALL


def test_ranks_from_environment_split_the_epoch(images, monkeypatch):
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        ds = StreamingDataset(images, shuffle_buffer=20)
        parts.append(keys(ds))
        assert len(parts[-1]) == len(ds)
    assert sorted(sum(parts, [])) == ALL
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="RANK=3"):
        len(StreamingDataset(images))


def test_equal_split_with_drop_last(images, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        parts.append(keys(StreamingDataset(images, drop_last=True)))
    assert len(parts[0]) == len(parts[1]) == 72 and not set(parts[0]) & set(parts[1])


def test_plain_torch_loader_with_persistent_workers_sees_set_epoch(images):
    ds = StreamingDataset(images, shuffle_buffer=40)
    loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2, persistent_workers=True)
    first = [k for b in loader for k in b["key"]]
    ds.set_epoch(1)  # reaches the persistent workers through the dataset's shared-memory control tensor
    second = [k for b in loader for k in b["key"]]
    assert sorted(first) == sorted(second) == ALL and first != second
    assert first == [k for b in torch.utils.data.DataLoader(StreamingDataset(images, shuffle_buffer=40), batch_size=10,
                                                            num_workers=2) for k in b["key"]]


def test_state_dict_resumes_in_process_and_rejects_other_configs(images):
    ds = StreamingDataset(images, seed=3, shuffle_buffer=30)
    full = keys(ds)
    it = iter(ds)
    head = [next(it)["key"] for _ in range(37)]
    state = ds.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 37
    resumed = StreamingDataset(images, seed=3, shuffle_buffer=30)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert len(resumed) == 145 - 37
    tail = keys(resumed)
    assert head + tail == full
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["consumed"] == 0
    with pytest.raises(StateError, match=r"seed \(checkpoint 3, now 4\)") as info:
        StreamingDataset(images, seed=4, shuffle_buffer=31).load_state_dict(state)
    assert "shuffle_buffer" in str(info.value)
    with pytest.raises(StateError):
        resumed.load_state_dict({"epoch": 0})


def test_set_epoch_keeps_a_pending_resume_of_the_same_epoch(images):
    ds = StreamingDataset(images, shuffle_buffer=30)
    ds.load_state_dict({**ds.state_dict(), "consumed": 100})
    ds.set_epoch(0)  # the usual `for epoch in ...: set_epoch(epoch)` after loading a checkpoint of epoch 0
    assert len(keys(ds)) == 45
    ds.set_epoch(1)
    assert len(keys(ds)) == 145


def test_corrupt_shard_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path, rows=(10, 10))
    path = tmp_path / "shard-00001.arrow"
    path.write_bytes(path.read_bytes()[:-40])  # lose the footer
    with pytest.raises(ShardError, match="shard-00001.arrow"):
        keys(StreamingDataset(root, shuffle=False))


def test_shard_dataset_random_access(images):
    ds = ShardDataset(images)
    assert len(ds) == 145
    assert [s["key"] for s in ds.__getitems__([144, 0, 80, -1, 80])] == ["000144", "000000", "000080", "000144", "000080"]
    assert ds[77]["image"][:6] == b"000077"
    with pytest.raises(IndexError, match="145"):
        ds[145]
    assert ds._open
    clone = pickle.loads(pickle.dumps(ds))  # what spawn workers get: no open maps, reopened on demand
    assert not clone._open and clone[3]["key"] == "000003"
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=torch.utils.data.RandomSampler(ds), num_workers=2)
    got = [k for batch in loader for k in batch["key"]]
    assert sorted(got) == ALL
    with pytest.raises(ConfigError, match="remote"):
        ShardDataset("s3://bucket/data")


def test_shard_dataset_reopens_within_max_open(images):
    ds = ShardDataset(images, max_open=1, columns=["key"], transform=lambda s: s["key"])
    assert [ds[i] for i in (0, 50, 0, 120)] == ["000000", "000050", "000000", "000120"]
    assert len(ds._open) == 1
