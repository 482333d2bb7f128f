"""`stoker verify --deep`: decode every image and check every token array, naming shard, row and key."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stoker.formats.manifest import Manifest, ShardInfo
from stoker.formats.pack import pack_dataset
from stoker.formats.schema import describe, image_schema, text_schema
from stoker.formats.shard import create_writer
from stoker.formats.verify import verify


def _write(dst: Path, kind: str, samples: list[dict], **manifest_fields) -> None:
    schema = image_schema() if kind == "image" else text_schema(np.dtype(np.uint16))
    writer = create_writer("arrow", str(dst / "shard-00000.arrow"), schema)
    for sample in samples:
        writer.add(sample)
    rows, nbytes, digest = writer.close()
    lengths = np.array([s["length"] for s in samples], np.uint32) if kind == "text" else None
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
