"""`stoker verify --deep`: decode every image and check every token array, naming shard, row and key."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from fsspec.implementations.memory import MemoryFileSystem

from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.pack import pack_dataset
from stoker.formats.schema import describe, image_schema, text_schema
from stoker.formats.shard import create_writer
from stoker.formats.verify import verify


def _write(dst: Path, kind: str, samples: list[dict], lengths: list[int] | None = None, **manifest_fields) -> None:
    schema = image_schema() if kind == "image" else text_schema(np.dtype(np.uint16))
    writer = create_writer("arrow", str(dst / "shard-00000.arrow"), schema)
    for sample in samples:
        writer.add(sample)
    rows, nbytes, digest = writer.close()
    if kind == "text":
        lengths = np.array([s["length"] for s in samples] if lengths is None else lengths, np.uint32)
    Manifest(kind=kind, format="arrow", schema=describe(schema), shards=(ShardInfo("shard-00000.arrow", rows, nbytes, digest, lengths),),
             **manifest_fields).save(str(dst))


def test_deep_verify_passes_on_a_good_dataset(image_tree: Path, text_corpus: Path, tmp_path: Path) -> None:
    pack_dataset(str(image_tree), str(tmp_path / "img"), workers=1, progress=False)
    pack_dataset(str(text_corpus), str(tmp_path / "txt"), workers=1, progress=False)
    assert verify(str(tmp_path / "img"), deep=True) == []
    assert verify(str(tmp_path / "txt"), deep=True) == []


def test_deep_verify_names_undecodable_images_and_unsafe_keys(image_tree: Path, tmp_path: Path) -> None:
    good = next(image_tree.rglob("*.jpg")).read_bytes()
    samples = [
        {"key": "a/good.jpg", "label": 0, "image": good, "height": 1, "width": 1},
        {"key": "a/bad.jpg", "label": 0, "image": b"not an image", "height": 1, "width": 1},
        {"key": "../escape.jpg", "label": 0, "image": good, "height": 1, "width": 1},
    ]
    _write(tmp_path, "image", samples, classes=("a",))
    assert verify(str(tmp_path)) == []  # checksums are fine: only --deep looks inside
    problems = [str(p) for p in verify(str(tmp_path), deep=True)]
    assert any("row 1 ('a/bad.jpg'): image does not decode" in p for p in problems), problems
    assert any("row 2 ('../escape.jpg')" in p and "unsafe" in p for p in problems), problems
    assert all(p.startswith("shard-00000.arrow: ") for p in problems) and len(problems) == 2


def test_deep_verify_checks_lengths_and_vocabulary(tmp_path: Path) -> None:
    samples = [
        {"key": "t:1", "tokens": np.array([1, 2, 3], np.uint16), "length": 3},
        {"key": "t:2", "tokens": np.array([1, 2], np.uint16), "length": 5},
        {"key": "t:3", "tokens": np.array([300], np.uint16), "length": 1},
    ]
    _write(tmp_path, "text", samples, vocab_size=256, token_dtype="uint16")
    problems = [str(p) for p in verify(str(tmp_path), deep=True)]
    assert any("(row 1): column 'length' says 5 but 2 tokens are stored" in p for p in problems), problems
    assert any("(row 2): token id 300 in column 'tokens' is outside the vocabulary of 256" in p for p in problems)
    # Readers refuse both, so verify reports them without --deep too.
    assert [str(p) for p in verify(str(tmp_path))] == problems


def test_verify_lists_every_row_whose_tokens_disagree_with_the_manifests_lengths(tmp_path: Path) -> None:
    samples = [{"key": f"t:{i}", "tokens": np.arange(i + 1, dtype=np.uint16), "length": i + 1} for i in range(4)]
    _write(tmp_path, "text", samples, lengths=[1, 9, 3, 7], vocab_size=256, token_dtype="uint16")
    problems = [str(p) for p in verify(str(tmp_path))]
    assert problems == ["shard-00000.arrow (row 1): column 'tokens' has 2 tokens but the manifest records 9",
                        "shard-00000.arrow (row 3): column 'tokens' has 4 tokens but the manifest records 7"]


def test_a_remote_shard_is_read_once_to_be_hashed_and_checked(text_corpus: Path, monkeypatch) -> None:
    url = f"memory://verify-{uuid.uuid4().hex[:8]}"
    manifest = pack_dataset(str(text_corpus), url, shard_size=8 << 10, workers=1, progress=False).manifest
    opened: Counter[str] = Counter()
    real_open = MemoryFileSystem._open

    def counting_open(self, path, *args, **kwargs):
        opened[path.rsplit("/", 1)[-1]] += 1
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", counting_open)
    assert verify(url, manifest=manifest) == []  # every shard opened and its contents checked, from those bytes
    assert {name: opened[name] for name in (s.name for s in manifest.shards)} == {s.name: 1 for s in manifest.shards}
    victim = manifest.shards[1].name
    fs = MemoryFileSystem()
    data = bytearray(fs.cat_file(f"{url}/{victim}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{url}/{victim}", bytes(data))
    problems = [str(p) for p in verify(url, manifest=manifest)]
    assert len(problems) == 1 and problems[0].startswith(f"{victim}: sha256 ") and "(corrupt)" in problems[0]
