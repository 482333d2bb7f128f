"""Untrusted datasets on the read path (StreamingDataset, ShardDataset): forged manifests and shards give a stoker
error naming the shard, in bounded time and memory; a bounded fuzz of whole datasets gives samples or stoker errors.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from stoker.synthetic import make_dataset
from _forge import read_both, resign

from stoker import StreamingDataset
from stoker.dataloader import ShardDataset
from stoker.errors import ManifestError, ShardError, StokerError
from stoker.formats.manifest import Manifest

pytestmark = pytest.mark.timeout(60)


def _read_all(root: str) -> list[str]:
    keys = [s["key"] for s in StreamingDataset(root, shuffle=False)]
    ds = ShardDataset(root)
    assert [ds[i]["key"] for i in range(len(ds))] == keys
    return keys


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_shard_with_other_rows_than_the_manifest_names_the_shard(tmp_path, fmt):
    root = make_dataset(tmp_path / "a", rows=(10, 10), fmt=fmt)
    other = make_dataset(tmp_path / "b", rows=(4, 10), fmt=fmt)
    name = f"shard-00000.{fmt}"
    shutil.copy(Path(other) / name, Path(root) / name)
    with pytest.raises(ShardError, match=f"{name}: has 4 rows but the manifest says 10"):
        list(StreamingDataset(root, shuffle=False))
    with pytest.raises(ShardError, match=f"{name}: has 4 rows"):
        ShardDataset(root)[3]


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_token_id_beyond_the_vocabulary_is_caught_on_the_read_path(tmp_path, fmt):
    # Sample i holds tokens equal to i: a vocabulary of 13 makes row 13 the first offender (in shard 1, row 3).
    root = make_dataset(tmp_path / "t", rows=(10, 10), kind="text", fmt=fmt)
    resign(root, lambda body: body.update(vocab_size=13))
    with pytest.raises(ShardError, match=rf"shard-00001\.{fmt} \(row 3\): token id 13 .* vocabulary of 13") as info:
        _read_all(root)
    assert info.value.shard == f"shard-00001.{fmt}" and info.value.row == 3
    resign(root, lambda body: body.update(vocab_size=20))
    assert _read_all(root) == [f"{i:06d}" for i in range(20)]  # every id below 20: fine


def test_token_lengths_that_disagree_with_the_manifest_name_the_row(tmp_path):
    root = make_dataset(tmp_path / "t", rows=(10,), kind="text")

    def edit(body):
        lengths = np.frombuffer(__import__("base64").b64decode(body["shards"][0]["lengths"]), "<u4").copy()
        lengths[6] += 1
        body["shards"][0]["lengths"] = __import__("base64").b64encode(lengths.tobytes()).decode()

    resign(root, edit)
    with pytest.raises(ShardError, match=r"shard-00000\.arrow \(row 6\): column 'tokens' has \d+ tokens but the "
                                         r"manifest records"):
        _read_all(root)


@pytest.mark.parametrize("sha256, rows", [("../../../tmp/escape", 10), ("A" * 64, 10), ("0" * 64, -5)])
def test_forged_shard_checksums_and_counts_are_manifest_errors(tmp_path, sha256, rows):
    # The checksum names the shard's cache file (s3:// datasets): "../" in it would write outside the cache.
    root = make_dataset(tmp_path / "a", rows=(10,))
    resign(root, lambda body: body["shards"][0].update(sha256=sha256, rows=rows))
    with pytest.raises(ManifestError, match="shard shard-00000.arrow: (sha256|negative rows)"):
        Manifest.load(root)


@pytest.mark.parametrize("name", ["../outside.arrow", "/etc/passwd", "a\0b.arrow", "s3:x", ".."])
def test_shard_names_outside_the_dataset_are_refused(tmp_path, name):
    root = make_dataset(tmp_path / "a", rows=(10,))
    resign(root, lambda body: body["shards"][0].update(name=name))
    with pytest.raises(ManifestError, match="not a plain file name"):
        StreamingDataset(root)


def test_msgpack_length_prefix_claiming_gigabytes_is_refused_without_allocating(tmp_path):
    root = make_dataset(tmp_path / "m", rows=(10,), fmt="msgpack", payload=(300, 301))
    path = Path(root) / "shard-00000.msgpack"
    data = bytearray(path.read_bytes())
    at = data.index(msgpack.packb(b"x" * 306)[:3])  # bin 16 header of the first image (306 bytes with its key)
    data[at:at + 3] = b"\xc6\xff\xff"  # bin 32 claiming ~4 GiB; the record stays the same size
    path.write_bytes(bytes(data))
    resign(root, lambda body: body["shards"][0].update(sha256=__import__("hashlib").sha256(data).hexdigest()))
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=r"shard-00000\.msgpack at byte offset \d+ \(row 0\): record 0 is corrupt"):
            list(StreamingDataset(root, shuffle=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for pos in rng.integers(0, len(out), int(rng.integers(1, 6))):
            out[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:
        del out[int(rng.integers(0, len(out))):]
    else:
        pos = int(rng.integers(0, max(1, len(out) - 8)))
        out[pos:pos + 8] = int(rng.integers(1 << 31, 1 << 62)).to_bytes(8, "little")
    return bytes(out)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, kind", [("arrow", "image"), ("msgpack", "text")])
def test_fuzzed_datasets_give_valid_samples_or_stoker_errors(tmp_path, fmt, kind):
    """Bounded: 40 mutations or 10 s per format; every outcome is complete valid samples or a StokerError."""
    good = make_dataset(tmp_path / "good", rows=(12, 12), kind=kind, fmt=fmt, seed=9)
    name = f"shard-00001.{fmt}"
    original = (Path(good) / name).read_bytes()
    rng = np.random.default_rng(99)
    outcomes = {"ok": 0, "error": 0}
    deadline = time.monotonic() + 10
    for case in range(40):
        if time.monotonic() > deadline:
            break
        root = tmp_path / f"case{case}"
        shutil.copytree(good, root)
        (root / name).write_bytes(_mutate(original, rng))
        try:
            samples, by_index = read_both(root)
        except StokerError:
            outcomes["error"] += 1
        else:
            assert len(samples) == len(by_index) == 24
            for sample in samples + by_index:
                assert isinstance(sample["key"], str)
                if kind == "text":
                    assert len(sample["tokens"]) == sample["length"]
                else:
                    assert isinstance(sample["image"], bytes)
            outcomes["ok"] += 1
        shutil.rmtree(root)
    assert outcomes["error"] > 0 and sum(outcomes.values()) >= 10, outcomes
