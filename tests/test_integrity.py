"""Every sample is checked on read: a changed byte anywhere in a sample is an error naming shard, row and key."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import stoker
from stoker import ShardDataset, StreamingDataset
from stoker.dataloader.reader import ReadOptions
from stoker.errors import ChecksumError, ShardError, UncheckedDataWarning
from stoker.formats import integrity
from stoker.formats.manifest import Manifest
from stoker.formats.shard import open_shard

from stoker.synthetic import make_dataset
from _forge import flip_sample_byte


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_a_flipped_image_byte_is_an_error_naming_shard_row_and_key(tmp_path: Path, fmt: str) -> None:
    root = Path(make_dataset(tmp_path / "d", rows=(20, 20), fmt=fmt))
    shard = root / Manifest.load(str(root)).shards[1].name
    # Sample 000027 (row 7 of shard 1): its image bytes start with its key, then random bytes.
    flip_sample_byte(shard, "000027", 3)
    for read in (lambda: list(StreamingDataset(str(root), shuffle=False)),
                 lambda: ShardDataset(str(root))[27],
                 lambda: list(stoker.DataLoader(StreamingDataset(str(root), shuffle=False), batch_size=8, num_workers=2)),
                 lambda: [b for b in open_shard(shard).iter_batches()],
                 lambda: open_shard(shard).take([7])):
        with pytest.raises(ChecksumError) as info:
            read()
        assert shard.name in str(info.value) and "row 7" in str(info.value) and "'000027'" in str(info.value)
        assert isinstance(info.value, ShardError)
    # The other samples are intact, and the switch reads without checking (the damaged bytes come through).
    samples = list(StreamingDataset(str(root), shuffle=False, read=ReadOptions(checksums=False)))
    assert len(samples) == 40 and integrity.COLUMN not in samples[0]
    assert ShardDataset(str(root), checksums=False)[26]["key"] == "000026"
    assert len(list(open_shard(shard, checksums=False).iter_batches())) >= 1


def test_labels_and_sizes_are_covered_too(tmp_path: Path) -> None:
    # A changed label is a silently wrong sample as much as a changed pixel: the checksum covers every field.
    root = Path(make_dataset(tmp_path / "d", rows=(30,), fmt="msgpack"))
    shard = root / Manifest.load(str(root)).shards[0].name
    data = bytearray(shard.read_bytes())
    at = data.index(b"\xa5label", data.index(b"000013"))  # msgpack: "label" key of row 13, then its value
    assert data[at + 6] == 3  # label 13 % 10, a positive fixint
    data[at + 6] = 4
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"row 13\).*'000013'"):
        ShardDataset(str(root))[13]
    assert ShardDataset(str(root), checksums=False)[13]["label"] == 4  # what unchecked reading would have given


def test_text_tokens_are_checked(tmp_path: Path) -> None:
    root = Path(make_dataset(tmp_path / "d", rows=(25,), kind="text"))
    shard = root / Manifest.load(str(root)).shards[0].name
    reader = open_shard(shard)
    row = reader.row(11)
    reader.close()
    tokens = row["tokens"].astype("<u2").tobytes()
    data = bytearray(shard.read_bytes())
    at = data.index(tokens)
    data[at] ^= 0x01  # token id 11 becomes 10: still in the vocabulary, only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"row 11\).*'000011'"):
        list(StreamingDataset(str(root), shuffle=False))


def test_a_damaged_remote_cache_entry_is_an_error(tmp_path: Path) -> None:
    # Remote shards are checked by sha256 when downloaded; a cache entry damaged later is caught per sample.
    from stoker.synthetic import to_memory

    url = to_memory(make_dataset(tmp_path / "d", rows=(20,)))
    cache = tmp_path / "cache"
    assert len(list(StreamingDataset(url, shuffle=False, cache_dir=str(cache)))) == 20
    entry = next(p for p in cache.rglob("*shard-00000.arrow*") if p.is_file())
    flip_sample_byte(entry, "000005", 4, 0x10)
    with pytest.raises(ChecksumError, match=r"row 5\).*'000005'"):
        list(StreamingDataset(url, shuffle=False, cache_dir=str(cache)))


def test_a_shard_without_its_checksum_column_is_refused(tmp_path: Path) -> None:
    # A byte flipped in the column's name must not turn checking off for that shard.
    root = Path(make_dataset(tmp_path / "d", rows=(10,)))
    shard = root / Manifest.load(str(root)).shards[0].name
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"xxh3", b"xxh4"))
    with pytest.raises(ShardError, match="no .xxh3. checksum column"):
        list(StreamingDataset(str(root), shuffle=False))


def _make_v1_dataset(root: Path) -> str:
    """A dataset as stokers before format version 2 wrote it: no checksum column, format_version 1."""
    from stoker.formats.schema import describe, image_schema
    from stoker.formats.shard import create_writer
    from stoker.formats.manifest import ShardInfo

    root.mkdir()
    schema = image_schema()
    schema = schema.remove(schema.get_field_index(integrity.COLUMN))
    writer = create_writer("arrow", str(root / "shard-00000.arrow"), schema)
    for i in range(12):
        writer.add({"key": f"{i:06d}", "label": i % 3, "image": bytes([i]) * 50, "height": 5, "width": 10})
    rows, size, sha = writer.close()
    Manifest(kind="image", format="arrow", schema=describe(schema), shards=(ShardInfo("shard-00000.arrow", rows, size, sha),),
             format_version=1).save(str(root))
    return str(root)


def test_datasets_packed_before_checksums_read_with_one_warning(tmp_path: Path) -> None:
    root = _make_v1_dataset(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["format_version"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(stoker.DataLoader(StreamingDataset(root, shuffle=False), batch_size=4, num_workers=2))
        sample = ShardDataset(root)[5]
    unchecked = [w for w in caught if issubclass(w.category, UncheckedDataWarning)]
    assert len(unchecked) == 2 and "format version 1" in str(unchecked[0].message)  # one per dataset, none per read
    assert [k for b in batches for k in b["key"]] == [f"{i:06d}" for i in range(12)]
    assert sample["image"] == bytes([5]) * 50 and sample["label"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardDataset(root, checksums=False)  # asked not to check: nothing to warn about


def test_swapped_and_truncated_bytes_are_errors(tmp_path: Path) -> None:
    # Labels of rows 3 and 4 swapped (each sample still valid on its own), two image bytes transposed in row 9.
    root = Path(make_dataset(tmp_path / "d", rows=(12,), fmt="msgpack"))
    shard = root / Manifest.load(str(root)).shards[0].name
    pristine = shard.read_bytes()
    data = bytearray(pristine)
    at3 = data.index(b"\xa5label", data.index(b"000003")) + 6
    at4 = data.index(b"\xa5label", data.index(b"000004")) + 6
    data[at3], data[at4] = data[at4], data[at3]
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"row 3\).*'000003'"):
        ShardDataset(str(root))[3]
    with pytest.raises(ChecksumError, match=r"row 4\).*'000004'"):
        ShardDataset(str(root))[4]
    data = bytearray(pristine)
    image = data.index(b"000009", data.index(b"000009") + 6) + 6  # the random bytes after the image's key prefix
    while data[image] == data[image + 1]:
        image += 1
    data[image], data[image + 1] = data[image + 1], data[image]
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"row 9\).*'000009'"):
        list(StreamingDataset(str(root), shuffle=False))
    shard.write_bytes(pristine[:-100])
    with pytest.raises(ShardError, match=shard.name):
        list(StreamingDataset(str(root), shuffle=False))


def test_rows_checked_again_from_the_same_sources_see_the_bytes_as_they_are_now() -> None:
    # A catalog passes one list of sources for every batch; what is kept between checks must be views of the bytes,
    # never anything computed from them, so that a byte changed after one check fails the next.
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, 1000, dtype=np.uint8) for _ in range(3)]
    src, start, length = np.array([0, 2, 1, 2], np.int32), np.array([0, 10, 500, 900]), np.array([100, 50, 0, 100])
    schema = pa.schema([pa.field("image", pa.binary())])

    def digests() -> list[int]:
        rows = integrity.Rows(len(src))
        rows.add_variable(sources, src, start, length)
        return rows.digests().tolist()

    packed = [integrity.digest_sample({"image": sources[s][a:a + n].tobytes()}, schema)
              for s, a, n in zip(src, start, length)]
    assert digests() == packed
    sources[2][905] ^= 1
    assert [a == b for a, b in zip(digests(), packed)] == [True, True, True, False]
