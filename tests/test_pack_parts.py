"""Partitioned packing (`--part I/N`) as real subprocesses, `stoker merge`, and `--files-from`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stoker.cli import main as stoker_main
from stoker.errors import ManifestError
from stoker.formats.manifest import Manifest
from stoker.formats.merge import merge
from stoker.formats.pack import pack_dataset

PACK = [sys.executable, "-c", "import sys; from stoker.cli import pack_main; sys.exit(pack_main())"]


def _pack_part(src: Path, dst: Path, part: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PACK, str(src), str(dst), "--workers", "1", "--shard-size", "32KB", "--quiet", "--part", part],
                          capture_output=True, text=True, timeout=120)


def test_parts_as_processes_merge_to_the_same_samples_as_one_run(image_tree: Path, tmp_path: Path) -> None:
    single = pack_dataset(str(image_tree), str(tmp_path / "one"), shard_size=32 << 10, workers=1, progress=False).manifest
    dst = tmp_path / "parts"
    procs = [subprocess.Popen([*PACK, str(image_tree), str(dst), "--workers", "1", "--shard-size", "32KB", "--quiet", "--part", f"{i}/3"])
             for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    merged = merge(str(dst))
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in single.shards]
    assert merged.num_samples == single.num_samples and merged.classes == single.classes
    assert all(s.name.startswith(f"part-0000{i}-of-00003-shard-") for i in range(3) for s in Manifest.load(str(dst / f"manifest.part-0000{i}-of-00003.json")).shards)
    assert stoker_main(["verify", str(dst)]) == 0
    assert merge(str(dst)) == merged  # idempotent
    assert _pack_part(image_tree, dst, "1/3").returncode == 0  # rerunning a part changes nothing
    assert merge(str(dst)) == merged


def test_merge_names_missing_and_corrupt_parts_and_writes_nothing(image_tree: Path, tmp_path: Path) -> None:
    assert _pack_part(image_tree, tmp_path, "0/3").returncode == 0
    assert _pack_part(image_tree, tmp_path, "2/3").returncode == 0
    with pytest.raises(ManifestError, match=r"part 1/3 is missing"):
        merge(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()
    assert _pack_part(image_tree, tmp_path, "1/3").returncode == 0
    shard = sorted(tmp_path.glob("part-00002-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ManifestError, match=rf"part 2/3: shard {shard.name}: size"):
        merge(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_files_from_packs_only_the_listed_images(image_tree: Path, tmp_path: Path) -> None:
    files = sorted(p.relative_to(image_tree).as_posix() for p in image_tree.rglob("*.jpg"))[::2]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files) + "\n")
    manifest = pack_dataset(str(image_tree), str(tmp_path / "out"), files_from=str(listing), workers=1, progress=False).manifest
    assert manifest.num_samples == len(files)
    listing.write_text("\n".join(files + ["n01440764_tench/missing.jpg"]))
    result = subprocess.run([*PACK, str(image_tree), str(tmp_path / "bad"), "--files-from", str(listing), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "missing.jpg: listed in --files-from but missing" in result.stderr


def test_an_empty_part_and_a_failed_merge_in_any_order_still_verify(image_tree: Path, tmp_path: Path) -> None:
    # One shard for the whole tree: part 0 of 2 is empty, part 1 holds every sample.
    from stoker.formats.verify import verify

    single = pack_dataset(str(image_tree), str(tmp_path / "one"), workers=1, progress=False).manifest
    orders = {
        "issue": ["0/2", "merge-fails", "1/2", "merge", "merge"],
        "reversed": ["1/2", "merge-fails", "0/2", "merge"],
        "rerun after merge": ["0/2", "1/2", "merge", "0/2", "1/2", "merge"],
    }
    for name, steps in orders.items():
        dst = tmp_path / name.replace(" ", "-")
        for step in steps:
            if step == "merge-fails":
                with pytest.raises(ManifestError, match="is missing"):
                    merge(str(dst))
                assert not (dst / "manifest.json").exists()
            elif step == "merge":
                merged = merge(str(dst))
            else:
                index, count = map(int, step.split("/"))
                pack_dataset(str(image_tree), str(dst), workers=1, progress=False, part=(index, count))
        assert verify(str(dst)) == [], name
        assert [s.sha256 for s in merged.shards] == [s.sha256 for s in single.shards], name
        assert merged.num_samples == single.num_samples and stoker_main(["verify", str(dst)]) == 0


def test_an_empty_part_is_redone_when_the_input_changed(image_tree: Path, tmp_path: Path) -> None:
    import shutil

    src = Path(shutil.copytree(image_tree, tmp_path / "src"))
    dst = tmp_path / "dst"
    first = pack_dataset(str(src), str(dst), workers=1, progress=False, part=(0, 2)).manifest
    assert not first.shards and not first.skipped
    (src / sorted(p.name for p in src.iterdir())[0] / "notes.txt").write_text("not an image")
    # Same empty plan, different listing: the run says the DST holds something else instead of keeping the stale part.
    from stoker.errors import ConfigError

    with pytest.raises(ConfigError, match="already holds a different packed dataset"):
        pack_dataset(str(src), str(dst), workers=1, progress=False, part=(0, 2), on_error="skip")
    redone = pack_dataset(str(src), str(dst), workers=1, progress=False, part=(0, 2), on_error="skip", overwrite=True)
    assert [s["path"].endswith("notes.txt") for s in redone.manifest.skipped] == [True]
