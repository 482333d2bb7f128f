"""Rows of remote shards read by themselves while the shards download (`stoker.dataloader.partial`): exactly the
packed rows, a fraction of the bytes, and the errors of the whole-shard path for damaged shards."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest

from stoker import DataLoader, StreamingDataset, cache
from stoker.dataloader import ReadOptions, partial
from stoker.dataloader.reader import OpenShard
from stoker.errors import ChecksumError, ShardError
from stoker.formats.arrow_shard import footer_blocks
from stoker.formats import integrity
from stoker.synthetic import keys_of, make_dataset

EARLY = ReadOptions(early_min_bytes=0, part_size=64 << 10, parallel_reads=2, attempts=2, backoff=0.01,
                    shard_timeout=30)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 shards of 60 rows in record batches of ~64 KB, payloads of 1-8 KB."""
    return make_dataset(tmp_path_factory.mktemp("early"), rows=(60,) * 4, batch_bytes=64 << 10, payload=(1000, 8000))


def read_locally(path: str, per_call: list[int] | None = None):
    data = open(path, "rb").read()
    calls = []

    def read(shard, spans):
        calls.extend(end - start for start, end in spans)
        if per_call is not None:
            per_call.append(len(spans))
        return [data[start:end] for start, end in spans]

    return data, read, calls


def table_of(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def rows_of(opened: OpenShard, column: str, rows) -> list[bytes]:
    col = opened.columns[column]
    return [bytes(col.sources[col.src[r]][col.start[r]:col.start[r] + col.length[r]]) for r in rows]


@pytest.mark.parametrize("large", [1024, 0])  # 0: every values buffer is read by rows
def test_rows_read_by_themselves_are_exactly_the_packed_rows(images, monkeypatch, large):
    # Sizes scaled to these small shards: 4 KB of head and tail, the batches' first 512 bytes with their metadata.
    monkeypatch.setattr(partial, "LARGE", large)
    monkeypatch.setattr(partial, "HEAD", 4096)
    monkeypatch.setattr(partial, "LEAD", 512)
    data, read, calls = read_locally(os.path.join(images, "shard-00001.arrow"))
    table = table_of(data)
    shard = partial.PartialShard("shard-00001.arrow", len(data))
    pool = cache.IOPool(4, "test")
    rows = np.array([3, 17, 18, 41, 59])
    partial.fetch_rows({shard: rows}, read, pool, time.monotonic() + 10)
    opened = OpenShard(shard.reader(), table.schema.names, check=dict.fromkeys(table.schema.names, ""))
    assert rows_of(opened, "image", rows) == [table.column("image")[r].as_py() for r in rows.tolist()]
    assert rows_of(opened, "key", rows) == [table.column("key")[r].as_py().encode() for r in rows.tolist()]
    assert opened.columns["label"][rows].tolist() == table.column("label").to_numpy()[rows].tolist()
    assert opened.columns[integrity.COLUMN][rows].tolist() == table.column(integrity.COLUMN).to_numpy()[rows].tolist()
    if large:
        assert sum(calls) < len(data) // 4, "reading 5 of 60 rows took much of the shard"
    # More rows later: only what is missing is read, and the earlier rows are unchanged.
    before = len(calls)
    partial.fetch_rows({shard: np.array([3, 30])}, read, pool, time.monotonic() + 10)
    opened = OpenShard(shard.reader(), table.schema.names, check=dict.fromkeys(table.schema.names, ""))
    assert rows_of(opened, "image", [3, 30, 59]) == [table.column("image")[r].as_py() for r in (3, 30, 59)]
    assert len(calls) > before
    pool.close()


def test_many_ranges_of_a_shard_are_read_in_calls_of_at_most_per_call(images, monkeypatch):
    monkeypatch.setattr(partial, "LARGE", 0)  # every row's bytes are a range of their own
    monkeypatch.setattr(partial, "PER_CALL", 3)
    per_call: list[int] = []
    data, read, _ = read_locally(os.path.join(images, "shard-00002.arrow"), per_call)
    table = table_of(data)
    shard = partial.PartialShard("shard-00002.arrow", len(data))
    pool = cache.IOPool(4, "test")
    rows = np.arange(0, 60, 5)
    partial.fetch_rows({shard: rows}, read, pool, time.monotonic() + 10)
    pool.close()
    opened = OpenShard(shard.reader(), table.schema.names, check=dict.fromkeys(table.schema.names, ""))
    assert rows_of(opened, "image", rows) == [table.column("image")[r].as_py() for r in rows.tolist()]
    assert max(per_call) == 3 and len(per_call) > 3  # split into several calls, none over the limit


def test_token_lists_read_by_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(partial, "LARGE", 0)
    root = make_dataset(tmp_path / "text", rows=(50,), kind="text", batch_bytes=1024, payload=(10, 200))
    data, read, _ = read_locally(os.path.join(root, "shard-00000.arrow"))
    table = table_of(data)
    shard = partial.PartialShard("t", len(data))
    pool = cache.IOPool(2, "test")
    rows = np.array([0, 7, 49])
    partial.fetch_rows({shard: rows}, read, pool, time.monotonic() + 10)
    opened = OpenShard(shard.reader(), ["tokens"])
    col = opened.columns["tokens"]
    got = [col.sources[col.src[r]][col.start[r]:col.start[r] + col.length[r]].tolist() for r in rows.tolist()]
    assert got == [table.column("tokens")[r].as_py() for r in rows.tolist()]
    pool.close()


def test_a_damaged_footer_is_a_shard_error_naming_the_shard(images):
    data, _, _ = read_locally(os.path.join(images, "shard-00002.arrow"))
    damaged = data[:-64] + b"\0" * 64

    def read(shard, spans):
        return [damaged[start:end] for start, end in spans]

    shard = partial.PartialShard("shard-00002.arrow", len(damaged))
    pool = cache.IOPool(2, "test")
    with pytest.raises(ShardError, match="shard-00002.arrow"):
        partial.fetch_rows({shard: np.array([1])}, read, pool, time.monotonic() + 10)
    pool.close()


@pytest.mark.remote
def test_streaming_from_the_store_with_early_rows_delivers_every_sample_once(images, object_store, tmp_path):
    store = object_store(os.path.dirname(images), latency=0.02, rate=2e6)  # slow: the shards download for a while
    url = store.url("s3", os.path.basename(images))
    local = StreamingDataset(images, seed=3, shuffle_buffer=240)
    ds = StreamingDataset(url, seed=3, shuffle_buffer=240, storage_options=store.storage_options(),
                          cache_dir=str(tmp_path / "cache"), read=EARLY)
    expected = [(b["key"], b["image"]) for b in DataLoader(local, batch_size=16, num_workers=0)]
    got = [(b["key"], b["image"]) for b in DataLoader(ds, batch_size=16, num_workers=2)]
    assert [k for k, _ in got] == [k for k, _ in expected]  # the same order as from local disk
    assert all(a == b for (_, x), (_, y) in zip(got, expected) for a, b in zip(x, y))  # and the same bytes
    again = keys_of(list(DataLoader(ds, batch_size=16, num_workers=2)))
    assert sorted(again) == sorted(keys_of([{"key": k} for k, _ in got]))  # the next epoch, from the cache


@pytest.mark.remote
def test_a_damaged_row_read_early_names_its_shard_and_row(images, object_store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(images, bad)
    path = bad / "shard-00000.arrow"
    table = table_of(path.read_bytes())
    body = bytearray(path.read_bytes())
    value = table.column("image")[5].as_py()
    at = body.find(value)
    body[at + len(value) // 2] ^= 0xFF  # one byte of row 5's image: its size and the file's layout unchanged
    path.write_bytes(bytes(body))
    store = object_store(str(tmp_path), latency=0.02, rate=2e6)
    ds = StreamingDataset(store.url("s3", "bad"), shuffle=False, storage_options=store.storage_options(),
                          cache_dir=str(tmp_path / "cache"), read=EARLY)
    with pytest.raises(ChecksumError, match=r"shard-00000\.arrow.*row 5"):
        list(DataLoader(ds, batch_size=8, num_workers=0))


@pytest.mark.remote
def test_damaged_bytes_under_rows_read_early_give_the_packed_rows_or_a_shard_error(images, object_store, tmp_path):
    local = DataLoader(StreamingDataset(images, shuffle=False), batch_size=8, num_workers=0)
    expected = next(iter(local))
    data = open(os.path.join(images, "shard-00000.arrow"), "rb").read()
    tail = data[-10:]
    footer_len = int.from_bytes(tail[:4], "little")
    blocks = footer_blocks(data[len(data) - 10 - footer_len:-10], len(data), "shard-00000.arrow")
    # Where the structure lies (schema, footer, each record batch's metadata and first bytes), and anywhere at all.
    places = [range(0, 1024), range(len(data) - 1024, len(data))]
    places += [range(offset, offset + meta_len + 256) for offset, meta_len, _ in blocks]
    rng = np.random.default_rng(0)
    outcomes = []
    for case in range(40):
        copy = tmp_path / "fuzz" / f"c{case}"
        shutil.copytree(images, copy)
        body = bytearray(data)
        for _ in range(4):
            where = places[int(rng.integers(len(places)))] if case % 3 else range(len(body))
            body[int(rng.choice(where))] ^= int(rng.integers(1, 256))
        (copy / "shard-00000.arrow").write_bytes(bytes(body))
    store = object_store(str(tmp_path / "fuzz"), latency=0.0, rate=2e6)
    for case in range(40):
        ds = StreamingDataset(store.url("s3", f"c{case}"), shuffle=False, storage_options=store.storage_options(),
                              cache_dir=str(tmp_path / "cache" / str(case)), read=EARLY)
        try:
            got = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
        except ShardError as exc:  # checksum, layout, footer or metadata: each names the shard
            assert "shard-00000.arrow" in str(exc)
            outcomes.append("error")
            continue
        assert got["key"] == expected["key"] and got["image"] == expected["image"]
        outcomes.append("rows")
    assert "error" in outcomes  # the damage was seen at least once (a flip may fall on bytes no reader uses)


@pytest.mark.remote
def test_without_workers_shards_download_while_the_first_batch_is_in_use(images, object_store, tmp_path):
    # In the training process the next batch is asked for only after the training step: whole shards must not wait
    # for it (in a worker they wait until the first batch is made, which takes no training step).
    store = object_store(os.path.dirname(images), latency=0.02, rate=20e6)
    cache_dir = tmp_path / "cache"
    ds = StreamingDataset(store.url("s3", os.path.basename(images)), seed=3, shuffle_buffer=240, read=EARLY,
                          storage_options=store.storage_options(), cache_dir=str(cache_dir))
    batches = iter(DataLoader(ds, batch_size=16, num_workers=0))
    next(batches)
    deadline = time.monotonic() + 10  # a held download would wait for its read timeout: 30 s
    while len([n for n in os.listdir(cache_dir) if not n.startswith(".")]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len([n for n in os.listdir(cache_dir) if not n.startswith(".")]) == 4
    del batches
