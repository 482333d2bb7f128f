"""pack-dataset: determinism, bad inputs, skip policy, text sources, resume after SIGKILL, verify."""

from __future__ import annotations

import io

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stoker.cli import main as stoker_main
from stoker.cli import pack_main
from stoker.errors import ConfigError, SourceError
from stoker.formats.manifest import Manifest
from stoker.formats.pack import STATE_DIR, pack_dataset
from stoker.formats.shard import open_shard
from stoker.synthetic import make_image_tree


def _pack(src: Path, dst: Path, **options) -> Manifest:
    return pack_dataset(str(src), str(dst), progress=False, **{"workers": 1, **options}).manifest


@pytest.fixture()
def tree(image_tree: Path, tmp_path: Path) -> Path:
    """A private, editable copy of the session's image tree."""
    return Path(shutil.copytree(image_tree, tmp_path / "src"))


def test_same_input_gives_same_shards_with_any_worker_count(image_tree: Path, tmp_path: Path) -> None:
    one = _pack(image_tree, tmp_path / "a", shard_size=32 << 10)
    two = _pack(image_tree, tmp_path / "b", shard_size=32 << 10, workers=2)
    assert len(one.shards) > 2
    assert [(s.name, s.sha256) for s in one.shards] == [(s.name, s.sha256) for s in two.shards]
    assert not (tmp_path / "a" / STATE_DIR).exists()
    assert not [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p]


def test_rerun_is_a_no_op_and_different_options_need_overwrite(image_tree: Path, tmp_path: Path) -> None:
    first = _pack(image_tree, tmp_path, shard_size=32 << 10)
    again = pack_dataset(str(image_tree), str(tmp_path), shard_size=32 << 10, workers=1, progress=False)
    assert again.reused_shards == len(first.shards) and again.manifest == first
    with pytest.raises(ConfigError, match="overwrite=True"):
        _pack(image_tree, tmp_path, shard_size=128 << 10)
    replaced = _pack(image_tree, tmp_path, shard_size=128 << 10, overwrite=True)
    assert len(replaced.shards) < len(first.shards)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [s.name for s in replaced.shards]


def _break(tree: Path, kind: str) -> str:
    """Introduce one bad input into the tree; return a fragment the error must contain."""
    first = sorted((tree / sorted(os.listdir(tree))[0]).glob("*.jpg"))[0]
    if kind == "truncated":
        first.write_bytes(first.read_bytes()[:300])
        return first.name
    if kind == "not_an_image":
        (first.parent / "notes.txt").write_text("hello")
        return "notes.txt"
    if kind == "fake_jpeg":
        first.write_bytes(b"this is text, not a JPEG")
        return first.name
    if kind == "empty_class":
        (tree / "zzz_empty").mkdir()
        return "zzz_empty"
    if kind == "symlink_loop":
        os.symlink(first.parent, first.parent / "loop")
        return "loop"
    if kind == "unsafe_key":
        shutil.copy(first, first.parent / "back\\slash.jpg")
        return "back\\\\slash.jpg"
    raise AssertionError(kind)


BAD_INPUTS = ["truncated", "not_an_image", "fake_jpeg", "empty_class", "symlink_loop", "unsafe_key"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_raises_naming_the_file(tree: Path, tmp_path: Path, kind: str) -> None:
    fragment = _break(tree, kind)
    with pytest.raises(SourceError, match=fragment.replace("\\\\", "\\\\\\\\") if kind == "unsafe_key" else fragment):
        _pack(tree, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_skipped_and_listed(tree: Path, tmp_path: Path, kind: str) -> None:
    total = len(list(tree.rglob("*.jpg")))
    fragment = _break(tree, kind).replace("\\\\", "\\")
    manifest = _pack(tree, tmp_path / "out", on_error="skip")
    assert any(fragment in item["path"] for item in manifest.skipped), manifest.skipped
    lost = 1 if kind in ("truncated", "fake_jpeg") else 0
    assert manifest.num_samples == total - lost


def test_error_in_a_later_shard_keeps_finished_shards(tree: Path, tmp_path: Path) -> None:
    last_class = sorted(os.listdir(tree))[-1]
    victim = sorted((tree / last_class).glob("*.jpg"))[-1]
    good = victim.read_bytes()
    victim.write_bytes(b"garbage")
    with pytest.raises(SourceError, match=victim.name):
        _pack(tree, tmp_path / "out", shard_size=32 << 10)
    finished = sorted(p.name for p in (tmp_path / "out").glob("shard-*"))
    assert finished, "shards completed before the error must stay"
    victim.write_bytes(good)
    result = pack_dataset(str(tree), str(tmp_path / "out"), shard_size=32 << 10, workers=1, progress=False)
    assert result.reused_shards == len(finished)
    assert result.manifest == _pack(tree, tmp_path / "fresh", shard_size=32 << 10)


def test_resume_after_sigkill_of_a_real_pack_process(tmp_path: Path) -> None:
    src = make_image_tree(tmp_path / "src", num_classes=2, per_class=60, min_side=48, max_side=96, seed=3)
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-c", "import sys; from stoker.cli import pack_main; sys.exit(pack_main())",
           str(src), str(dst), "--workers", "1", "--shard-size", "8KB", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((dst / STATE_DIR).glob("shard-*.json"))) < 3:
        time.sleep(0.005)
    assert proc.poll() is None, "pack finished before it could be killed; make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (dst / "manifest.json").exists(), "no manifest may be visible after a crash"
    recorded = sorted(p.name.removesuffix(".json") for p in (dst / STATE_DIR).glob("shard-*.json"))
    finished = {name: (dst / name).stat().st_ino for name in recorded}  # durable and recorded before the kill
    assert len(finished) >= 3
    result = pack_dataset(str(src), str(dst), workers=1, shard_size=8 << 10, progress=False)
    assert result.reused_shards >= len(finished)
    # The finished shards were reused: the very same files, not rewritten.
    assert {name: (dst / name).stat().st_ino for name in finished} == finished
    resumed = Manifest.load(str(dst))
    fresh = _pack(src, tmp_path / "fresh", shard_size=8 << 10)
    assert resumed == fresh
    assert not [p for p in os.listdir(dst) if ".tmp-" in p]


def test_verify_catches_flipped_byte_and_truncation(image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = _pack(image_tree, tmp_path, shard_size=32 << 10)
    assert stoker_main(["verify", str(tmp_path)]) == 0
    flipped, cut = (tmp_path / manifest.shards[0].name), (tmp_path / manifest.shards[-1].name)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-10])
    capsys.readouterr()
    assert stoker_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {flipped.name}: sha256" in out and f"BAD {cut.name}: size" in out


def test_text_sources_jsonl_txt_parquet_and_pretokenized(tmp_path: Path) -> None:
    docs = ["hello world", "", "é unicode ✓", "last line without newline"]
    (tmp_path / "t.txt").write_text("\n".join(docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "t.parquet", row_group_size=2)
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"ids": [i, i + 1, 70000]}) for i in range(3)))
    for name, extra in (("t.txt", {}), ("t.parquet", {"text_field": "body"})):
        manifest = _pack(tmp_path / name, tmp_path / f"out-{name}", **extra)
        with open_shard(tmp_path / f"out-{name}" / manifest.shards[0].name) as reader:
            got = [bytes(r.astype(np.uint8)).decode() for r in reader.take(range(reader.num_rows)).column("tokens").to_numpy(zero_copy_only=False)]
        assert got == docs
        assert manifest.lengths.tolist() == [len(d.encode()) for d in docs]
    pre = _pack(tmp_path / "ids.jsonl", tmp_path / "out-ids", tokenizer="none", text_field="ids")
    assert pre.token_dtype == "uint32" and pre.lengths.tolist() == [3, 3, 3]
    with pytest.raises(SourceError, match=r"ids.jsonl:1: token id 70000 is outside the vocabulary of 1000"):
        _pack(tmp_path / "ids.jsonl", tmp_path / "out-small", tokenizer="none", text_field="ids", vocab_size=1000)


def test_text_row_without_the_field_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n{"text": "ok"}\n')
    with pytest.raises(SourceError, match=r"c.jsonl:2: no field 'text'"):
        _pack(tmp_path / "c.jsonl", tmp_path / "out")
    manifest = _pack(tmp_path / "c.jsonl", tmp_path / "out", on_error="skip")
    assert manifest.num_samples == 2 and manifest.skipped[0]["path"].endswith("c.jsonl:2")


def test_max_side_shrinks_large_images_only(tree: Path, tmp_path: Path) -> None:
    manifest = _pack(tree, tmp_path / "out", max_side=100)
    for info in manifest.shards:
        with open_shard(tmp_path / "out" / info.name) as reader:
            table = reader.take(range(reader.num_rows))
            for key, image, h, w in zip(*(table.column(c).to_pylist() for c in ("key", "image", "height", "width"))):
                assert max(h, w) <= 100
                original = (tree / key).read_bytes()
                from PIL import Image

                with Image.open(tree / key) as im:
                    if max(im.size) <= 100:
                        assert image == original
                        continue
                # A shrunk image: the stored bytes are a new JPEG of the recorded size, not the original.
                assert image != original
                with Image.open(io.BytesIO(image)) as stored:
                    assert stored.format == "JPEG" and stored.size == (w, h) and max(stored.size) == 100


def test_cli_prints_summary_and_inspect_histogram(packed_text: Path, image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert pack_main([str(image_tree), str(tmp_path), "--workers", "1", "--quiet"]) == 0
    assert "packed 24 image samples" in capsys.readouterr().out
    assert stoker_main(["inspect", str(packed_text)]) == 0
    out = capsys.readouterr().out
    assert "samples  300" in out and "length histogram" in out
    assert pack_main([str(tmp_path / "missing"), str(tmp_path / "x"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_validate_decode_finds_corruption_inside_the_compressed_data(tree: Path, tmp_path: Path) -> None:
    from PIL import Image

    victim = tree / sorted(os.listdir(tree))[0] / "zz.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(victim)
    data = bytearray(victim.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 40 : idat + 200] = bytes(160)  # zeroes inside the zlib stream; the file still ends with IEND
    victim.write_bytes(bytes(data))
    assert _pack(tree, tmp_path / "fast").num_samples == len(list(tree.rglob("*.*g")))
    with pytest.raises(SourceError, match="zz.png"):
        _pack(tree, tmp_path / "deep", validate="decode")


@pytest.mark.parametrize(
    "options, message",
    [({"format": "parquet"}, "^format="), ({"on_error": "ignore"}, "^on_error="), ({"shard_size": 10}, "^shard_size="),
     ({"validate": "full"}, "^validate="), ({"part": (3, 3)}, "^part="), ({"workers": 0}, "^workers=")],
)
def test_invalid_options_fail_before_any_work(image_tree: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _pack(image_tree, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
