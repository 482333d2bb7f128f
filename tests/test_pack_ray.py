"""`pack-dataset --engine ray` on a real local Ray instance: same samples as a local run and as N array parts,
a task killed mid-shard is retried into a complete shard, bad inputs name the file, S3 in and out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from stoker.cli import main as stoker_main
from stoker.cli import pack_main
from stoker.errors import ConfigError, MissingExtraError, SourceError, StokerError
from stoker.formats import ray_engine
from stoker.formats.sources import images
from stoker.formats.manifest import Manifest
from stoker.formats.merge import merge
from stoker.formats.pack import pack_dataset
from stoker.formats.verify import verify
from test_pack_remote import PACK, samples_of, upload


def test_engine_ray_without_ray_names_the_extra(image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when it is not installed
    with pytest.raises(MissingExtraError, match=r"engine=.ray.*pip install 'stoker\[ray\]'"):
        pack_dataset(str(image_tree), str(tmp_path / "out"), engine="ray", progress=False)
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_ray_options_are_checked_before_any_work(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ray_address='auto': only used with engine='ray'"):
        pack_dataset(str(image_tree), str(tmp_path), ray_address="auto")
    with pytest.raises(ConfigError, match="engine='ray' cannot use memory://"):
        pack_dataset(str(image_tree), "memory://out", engine="ray")
    with pytest.raises(ConfigError, match="engine='spark'"):
        pack_dataset(str(image_tree), str(tmp_path), engine="spark")


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray instance (2 CPUs) for this module; pack_dataset reuses a Ray it finds running."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_local_parts_and_ray_runs_hold_the_same_samples_each_once(ray_local, image_tree: Path, text_corpus: Path, tmp_path: Path) -> None:
    local = pack_dataset(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10, progress=False).manifest
    assert pack_main([str(image_tree), str(tmp_path / "ray"), "--engine", "ray", "--shard-size", "32KB", "--quiet"]) == 0
    procs = [subprocess.Popen([*PACK, str(image_tree), str(tmp_path / "parts"), "--workers", "1", "--shard-size", "32KB",
                               "--quiet", "--part", f"{i}/3"]) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    merge(str(tmp_path / "parts"))
    runs = {name: Manifest.load(str(tmp_path / name)) for name in ("local", "ray", "parts")}
    images = len(list(image_tree.rglob("*.jpg")))
    for name, manifest in runs.items():
        keys = [k for k, _ in samples_of(str(tmp_path / name))]
        assert len(keys) == len(set(keys)) == images, name  # every image exactly once
        assert samples_of(str(tmp_path / name)) == samples_of(str(tmp_path / "local")), name
        assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in local.shards], name
        assert stoker_main(["verify", str(tmp_path / name)]) == 0
    # Layouts differ only in shard names: a part's shards carry its part number.
    assert [s.name for s in runs["ray"].shards] == [s.name for s in local.shards]
    assert all(s.name.startswith("part-0000") for s in runs["parts"].shards)
    text = pack_dataset(str(text_corpus), str(tmp_path / "text"), shard_size=8 << 10, engine="ray", progress=False).manifest
    text_local = pack_dataset(str(text_corpus), str(tmp_path / "text-local"), shard_size=8 << 10, progress=False).manifest
    assert [s.sha256 for s in text.shards] == [s.sha256 for s in text_local.shards] and len(text.shards) > 2


def _crash_once(marker: str, shard: str, after: int):
    """A Ray task body that, on its first try at `shard`, SIGKILLs its own worker after `after` images."""

    def task(job, pack_shard):
        if job.name == shard:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first try crashes
            except FileExistsError:
                fd = None
            if fd is not None:
                real, loaded = images.load_image, []

                def load_then_die(*args, **kwargs):
                    if len(loaded) == after:
                        partial = {e.name: e.stat().st_size for e in os.scandir(job.dst) if ".tmp-" in e.name}
                        os.write(fd, json.dumps(partial).encode())
                        os.close(fd)
                        os.kill(os.getpid(), signal.SIGKILL)
                    loaded.append(1)
                    return real(*args, **kwargs)

                images.load_image = load_then_die
        return ray_engine.pack_shard_task(job, pack_shard)

    return task


@pytest.mark.slow
def test_ray_task_killed_mid_shard_is_retried_into_a_complete_shard(
    ray_local, image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    marker = str(tmp_path / "crashed.json")
    monkeypatch.setattr(ray_engine, "pack_shard_task", _crash_once(marker, "shard-00001.arrow", after=3))
    dst = tmp_path / "ray"
    # Tiny record batches, so the killed try has already written part of its shard.
    options = {"shard_size": 32 << 10, "batch_bytes": 1 << 10, "engine": "ray", "progress": False}
    with pytest.raises(StokerError, match=r"shard shard-00001.arrow: Ray task failed after 0 retries"):
        pack_dataset(str(image_tree), str(dst), max_retries=0, **options)
    assert not (dst / "manifest.json").exists() and not (dst / "shard-00001.arrow").exists()
    os.remove(marker)  # crash again on the next first try, which Ray now retries
    result = pack_dataset(str(image_tree), str(dst), **options)
    partial = json.loads(Path(marker).read_text())
    assert any(name.startswith(".shard-00001.arrow.tmp-") and size > 0 for name, size in partial.items()), partial
    local = pack_dataset(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10, batch_bytes=1 << 10, progress=False)
    assert [s.sha256 for s in result.manifest.shards] == [s.sha256 for s in local.manifest.shards]
    assert verify(str(dst)) == []
    assert not [p for p in os.listdir(dst) if ".tmp-" in p or p.startswith(".stoker-pack")]  # the half shard is gone


@pytest.mark.slow
def test_ray_bad_input_names_the_file_skip_lists_it_and_a_rerun_resumes(ray_local, image_tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(image_tree), str(src)], check=True)
    victim = sorted(src.rglob("*.jpg"))[-1]
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    options = {"shard_size": 32 << 10, "engine": "ray", "progress": False}
    with pytest.raises(SourceError, match=rf"{victim.name}: not an image") as err:
        pack_dataset(str(src), str(tmp_path / "out"), **options)
    assert "RayTaskError" not in str(err.value)  # the input's own error, not Ray's wrapper
    assert not (tmp_path / "out" / "manifest.json").exists()
    skipped = pack_dataset(str(src), str(tmp_path / "skip"), on_error="skip", **options)
    assert [s["path"] for s in skipped.manifest.skipped] == [victim.relative_to(src).as_posix()]
    assert skipped.manifest.num_samples == len(list(src.rglob("*.jpg"))) - 1
    victim.write_bytes(good)
    fixed = pack_dataset(str(src), str(tmp_path / "out"), **options)
    assert fixed.reused_shards > 0  # shards finished before the error were kept
    local = pack_dataset(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10, progress=False).manifest
    assert [s.sha256 for s in fixed.manifest.shards] == [s.sha256 for s in local.shards]


@pytest.mark.slow
@pytest.mark.remote
def test_ray_reads_and_writes_s3(ray_local, image_tree: Path, tmp_path: Path) -> None:
    from stoker.testing import S3Server

    with S3Server() as s3:
        s3.create_bucket("stoker-ray")
        so = s3.storage_options()
        base = f"s3://stoker-ray/{uuid.uuid4().hex[:8]}"
        upload(image_tree, f"{base}/raw", so)
        result = pack_dataset(f"{base}/raw", f"{base}/packed", shard_size=32 << 10, engine="ray", storage_options=so,
                              progress=False)
        local = pack_dataset(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10, progress=False).manifest
        assert [s.sha256 for s in result.manifest.shards] == [s.sha256 for s in local.shards]
        assert verify(f"{base}/packed", so) == []
        assert samples_of(f"{base}/packed", so) == samples_of(str(tmp_path / "local"))
