"""Shard formats: round trips, byte-exact images, random access, interop with plain Arrow tools, corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from stoker.errors import ManifestError, ShardError
from stoker.formats.manifest import Manifest
from stoker.formats.schema import text_schema, token_dtype
from stoker.formats.shard import batch_to_samples, create_writer, open_shard


def _all_samples(dataset: Path) -> list[dict]:
    manifest = Manifest.load(str(dataset))
    samples = []
    for info in manifest.shards:
        with open_shard(dataset / info.name) as reader:
            assert reader.num_rows == info.rows
            for batch in reader.iter_batches():
                samples += batch_to_samples(batch)
    return samples


def test_image_round_trip_is_byte_exact(packed_images: Path, image_tree: Path) -> None:
    manifest = Manifest.load(str(packed_images))
    samples = _all_samples(packed_images)
    files = sorted(p.relative_to(image_tree).as_posix() for p in image_tree.rglob("*.jpg"))
    assert [s["key"] for s in samples] == files
    assert len(manifest.shards) > 1 and manifest.num_samples == len(files)
    for sample in samples:
        assert sample["image"] == (image_tree / sample["key"]).read_bytes()
        assert manifest.classes[sample["label"]] == sample["key"].split("/")[0]
        from PIL import Image

        with Image.open(image_tree / sample["key"]) as image:
            assert (sample["width"], sample["height"]) == image.size


def test_text_round_trip_matches_byte_tokens(packed_text: Path, text_corpus: Path) -> None:
    manifest = Manifest.load(str(packed_text))
    samples = _all_samples(packed_text)
    docs = [json.loads(line)["text"] for line in text_corpus.read_text().splitlines()]
    assert len(samples) == len(docs) == manifest.num_samples
    for sample, doc in zip(samples, docs):
        assert sample["tokens"].dtype == np.uint16
        assert sample["tokens"].tobytes() == np.frombuffer(doc.encode(), np.uint8).astype(np.uint16).tobytes()
        assert sample["length"] == len(doc.encode())
    np.testing.assert_array_equal(manifest.lengths, [s["length"] for s in samples])


def test_random_access_matches_sequential(packed_text: Path) -> None:
    manifest = Manifest.load(str(packed_text))
    info = manifest.shards[0]
    with open_shard(packed_text / info.name) as reader:
        sequential = [s["key"] for b in reader.iter_batches() for s in batch_to_samples(b)]
        rows = [info.rows - 1, 0, info.rows // 2, 0]
        assert reader.take(rows).column("key").to_pylist() == [sequential[r] for r in rows]
        assert reader.row(3)["key"] == sequential[3]
        with pytest.raises(IndexError):
            reader.take([info.rows])


def test_locate_maps_global_index_to_shard_row(packed_text: Path) -> None:
    manifest = Manifest.load(str(packed_text))
    last = manifest.num_samples - 1
    assert manifest.locate(0) == (0, 0)
    assert manifest.locate(manifest.shards[0].rows) == (1, 0)
    assert manifest.locate(last) == (len(manifest.shards) - 1, manifest.shards[-1].rows - 1)
    with pytest.raises(IndexError):
        manifest.locate(last + 1)


def test_arrow_shards_open_with_plain_pyarrow_duckdb_and_polars(image_tree: Path, tmp_path: Path) -> None:
    from stoker.formats.pack import pack_dataset

    pack_dataset(str(image_tree), str(tmp_path), shard_size=64 << 10, workers=1, progress=False)
    first = sorted(tmp_path.glob("shard-*.arrow"))[0]
    table = pa.ipc.open_file(pa.memory_map(str(first))).read_all()
    assert table.schema.names == ["key", "label", "image", "height", "width", "xxh3"]
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    frame = polars.read_ipc(str(first))
    assert frame["key"].to_list() == table.column("key").to_pylist()
    count = duckdb.sql("select count(*), max(label) from frame").fetchall()[0]
    assert count == (table.num_rows, max(table.column("label").to_pylist()))


def test_uint32_tokens_when_vocabulary_is_large(tmp_path: Path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(None) == np.uint32
    for fmt in ("arrow", "msgpack"):
        path = tmp_path / f"big.{fmt}"
        writer = create_writer(fmt, str(path), text_schema(np.dtype(np.uint32)))
        writer.add({"key": "a", "tokens": np.array([70000, 1], np.uint32), "length": 2})
        writer.close()
        with open_shard(path) as reader:
            assert reader.row(0)["tokens"].tolist() == [70000, 1]


def _first_shard(dataset: Path) -> Path:
    return dataset / Manifest.load(str(dataset)).shards[0].name


def test_truncated_shard_is_a_shard_error_naming_it(packed_text: Path, tmp_path: Path) -> None:
    data = _first_shard(packed_text).read_bytes()
    broken = tmp_path / "cut.shard"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="cut.shard"):
        with open_shard(broken) as reader:
            list(reader.iter_batches())


def test_a_compressed_record_batch_is_refused_at_its_own_offset(tmp_path: Path) -> None:
    path = tmp_path / "zstd.arrow"
    table = pa.table({"x": pa.array([b"a" * 1000] * 100)})
    with pa.ipc.new_file(str(path), table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    # The error says what is wrong and where the batch lies, not that the file is unreadable.
    with pytest.raises(ShardError, match=r"^\S*zstd\.arrow at byte offset \d+: record batch 0 is compressed"):
        open_shard(path)


@pytest.fixture()
def msgpack_text(text_corpus: Path, tmp_path: Path) -> Path:
    from stoker.formats.pack import pack_dataset

    pack_dataset(str(text_corpus), str(tmp_path / "mp"), format="msgpack", shard_size=32 << 10, workers=1, progress=False)
    return tmp_path / "mp"


def test_forged_msgpack_index_is_rejected_without_allocating(msgpack_text: Path, tmp_path: Path) -> None:
    shard = _first_shard(msgpack_text)
    data = bytearray(shard.read_bytes())
    data[8:12] = (2**31).to_bytes(4, "little")  # header length claims 2 GB
    forged = tmp_path / "forged.msgpack"
    forged.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"forged.msgpack at byte offset 8"):
        open_shard(forged)


def test_flipped_byte_in_msgpack_record_names_row(msgpack_text: Path, tmp_path: Path) -> None:
    shard = _first_shard(msgpack_text)
    data = bytearray(shard.read_bytes())
    with open_shard(shard) as reader:
        start = int(reader._offsets[2])
    data[start] = 0xC1  # the one byte msgpack never uses
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(bytes(data))
    with open_shard(bad) as reader:
        with pytest.raises(ShardError, match=rf"bad.msgpack at byte offset {start} \(row 2\)"):
            reader.take([2])


def test_not_a_shard(tmp_path: Path) -> None:
    path = tmp_path / "x.arrow"
    path.write_bytes(b"hello world, not a shard")
    with pytest.raises(ShardError, match="not a stoker shard"):
        open_shard(path)


def test_manifest_checksum_and_shard_names_are_checked(packed_text: Path, tmp_path: Path) -> None:
    data = json.loads((packed_text / "manifest.json").read_text())
    data["shards"][0]["rows"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="checksum"):
        Manifest.load(str(tmp_path))
    manifest = Manifest.load(str(packed_text))
    escaping = manifest.replace(shards=(manifest.shards[0].__class__("../../etc/passwd", 1, 1, "0"),))
    escaping.save(str(tmp_path))
    with pytest.raises(ManifestError, match="not a plain file name"):
        Manifest.load(str(tmp_path))
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(str(tmp_path / "nowhere"))
    assert os.path.exists(tmp_path / "manifest.json")
