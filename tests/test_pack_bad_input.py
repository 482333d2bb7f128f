"""Packing never turns bad input into wrong samples, and never crashes on it: each case on real files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stoker import ShardDataset
from stoker.errors import ConfigError, SourceError
from stoker.formats.manifest import Manifest
from stoker.formats.pack import pack_dataset


@pytest.fixture
def tree(image_tree: Path, tmp_path: Path) -> Path:
    """A private copy of the 3-class tree (classes sorted: the first is labelled 0)."""
    return Path(shutil.copytree(image_tree, tmp_path / "src"))


def _pack(src: Path, dst: Path, **options) -> Manifest:
    return pack_dataset(str(src), str(dst), workers=1, progress=False, **options).manifest


def _classes(src: Path) -> list[str]:
    return sorted(p.name for p in src.iterdir() if p.is_dir())


def _labels_match_folders(dst: Path) -> list[str]:
    """Keys of the packed samples, after checking each sits under the class folder its label names."""
    manifest = Manifest.load(str(dst))
    ds = ShardDataset(str(dst), columns=["key", "label"])
    keys = []
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["key"].split("/", 1)[0] == manifest.classes[sample["label"]], sample
        keys.append(sample["key"])
    assert len(set(keys)) == len(keys)
    return keys


def test_a_symlink_loop_packs_every_image_once_under_its_own_class(tree: Path, tmp_path: Path) -> None:
    first, second = _classes(tree)[:2]
    (tree / first / "up").symlink_to("..")  # SRC/a/up -> SRC: a/up/b/* would be b's images labelled a
    with pytest.raises(SourceError, match=rf"{first}/up: symlink to SRC itself"):
        _pack(tree, tmp_path / "raise")
    manifest = _pack(tree, tmp_path / "skip", on_error="skip")
    keys = _labels_match_folders(tmp_path / "skip")
    assert len(keys) == 24 and not any("/up/" in k for k in keys)
    assert [s["path"] for s in manifest.skipped] == [f"{first}/up"]


def test_links_into_another_class_or_to_the_same_file_are_listed_once(tree: Path, tmp_path: Path) -> None:
    a, b, c = _classes(tree)
    image = sorted((tree / b).iterdir())[0].name
    (tree / a / "theirs").symlink_to(f"../{b}")  # a directory link into class b
    (tree / a / "borrowed.jpg").symlink_to(f"../{b}/{image}")  # a file link into class b
    (tree / c / "0-twin.jpg").symlink_to(sorted((tree / c).iterdir())[-1].name)  # a second path to c's own image
    outside = tmp_path / "elsewhere"  # a link to a folder outside SRC is followed: symlink farms are common
    outside.mkdir()
    shutil.copy(sorted((tree / b).iterdir())[1], outside / "extra.jpg")
    (tree / a / "farm").symlink_to(outside)
    manifest = _pack(tree, tmp_path / "dst", on_error="skip")
    keys = _labels_match_folders(tmp_path / "dst")
    assert len(keys) == 24 + 1 and f"{a}/farm/extra.jpg" in keys
    problems = {s["path"]: s["error"] for s in manifest.skipped}
    assert set(problems) == {f"{a}/theirs", f"{a}/borrowed.jpg", f"{c}/{sorted((tree / c).iterdir())[-1].name}"}
    assert "outside its class folder" in problems[f"{a}/theirs"] and "same file as" in problems[f"{c}/" + sorted((tree / c).iterdir())[-1].name]


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_a_file_name_that_is_not_utf8_is_named_with_either_policy(tree: Path, tmp_path: Path, fmt: str) -> None:
    first = _classes(tree)[0]
    good = sorted((tree / first).iterdir())[0]
    bad = os.path.join(os.fsencode(tree / first), b"caf\xe9.jpg")  # Latin-1 bytes, a real image inside
    shutil.copy(good, bad)
    with pytest.raises(SourceError, match=rf"{first}/caf\\xe9\.jpg: file name is not valid UTF-8"):
        _pack(tree, tmp_path / "raise", format=fmt)
    manifest = _pack(tree, tmp_path / "skip", format=fmt, on_error="skip")
    assert manifest.num_samples == 24 and [s["path"] for s in manifest.skipped] == [f"{first}/caf\\xe9.jpg"]
    assert len(_labels_match_folders(tmp_path / "skip")) == 24


def test_text_file_names_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    src = tmp_path / "text"
    src.mkdir()
    (src / "ok.jsonl").write_text('{"text": "hello"}\n')
    with open(os.path.join(os.fsencode(src), b"\xff.jsonl"), "w") as f:
        f.write('{"text": "hi"}\n')
    with pytest.raises(SourceError, match=r"\\xff\.jsonl: file name is not valid UTF-8"):
        _pack(src, tmp_path / "raise")
    manifest = _pack(src, tmp_path / "skip", on_error="skip")
    assert manifest.num_samples == 1 and [s["path"] for s in manifest.skipped] == ["\\xff.jsonl"]


def test_dst_inside_src_is_refused_before_anything_is_written(tree: Path) -> None:
    with pytest.raises(ConfigError, match="inside SRC"):
        _pack(tree, tree / "shards")
    assert not (tree / "shards").exists()


def test_empty_and_non_image_files_get_plain_messages_and_all_are_listed(tree: Path, tmp_path: Path) -> None:
    first = _classes(tree)[0]
    (tree / first / "empty.jpg").write_bytes(b"")
    (tree / first / "notes.jpg").write_text("not a picture")
    with pytest.raises(SourceError) as info:
        _pack(tree, tmp_path / "raise")
    message = str(info.value)
    assert "2 unreadable files" in message and "empty.jpg: empty file (0 bytes)" in message
    assert "notes.jpg: not an image" in message and " at 0x" not in message
    manifest = _pack(tree, tmp_path / "skip", on_error="skip")
    assert {s["path"]: s["error"] for s in manifest.skipped} == {
        f"{first}/empty.jpg": "empty file (0 bytes)",
        f"{first}/notes.jpg": "not an image (no format Pillow knows starts its 13 bytes)",
    }


def test_every_listing_problem_is_named_not_just_the_first(tree: Path, tmp_path: Path) -> None:
    a, b, _ = _classes(tree)
    (tree / a / "readme.txt").write_text("x")
    (tree / b / "labels.csv").write_text("x")
    (tree / "empty_class").mkdir()
    with pytest.raises(SourceError) as info:
        _pack(tree, tmp_path / "dst")
    message = str(info.value)
    assert "3 problems" in message
    for path in (f"{a}/readme.txt", f"{b}/labels.csv", "empty_class: empty class directory"):
        assert path in message


def test_a_class_folder_that_links_to_another_is_not_a_second_label(tree: Path, tmp_path: Path) -> None:
    a = _classes(tree)[0]
    (tree / "zz_alias").symlink_to(a)  # SRC/zz_alias -> SRC/a: a's images must not also be labelled zz_alias
    with pytest.raises(SourceError, match=rf"zz_alias: class folder is a symlink to '{a}'"):
        _pack(tree, tmp_path / "raise")
    manifest = _pack(tree, tmp_path / "skip", on_error="skip")
    assert "zz_alias" not in manifest.classes and len(_labels_match_folders(tmp_path / "skip")) == 24
