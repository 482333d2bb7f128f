"""pack-dataset with SRC and DST as fsspec URLs (memory://, and s3:// on a real loopback moto_server), parallel
listing, --files-from for a remote SRC, a source file that vanishes after listing, and a killed part rerun."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from stoker import storage
from stoker.cli import main as stoker_main
from stoker.errors import ManifestError, SourceError
from stoker.formats import listing
from stoker.formats.sources import images
from stoker.formats.manifest import Manifest
from stoker.formats.merge import merge
from stoker.formats.pack import pack_dataset
from stoker.formats.shard import open_shard
from stoker.formats.verify import verify
from stoker.synthetic import make_image_tree

PACK = [sys.executable, "-c", "import sys; from stoker.cli import pack_main; sys.exit(pack_main())"]
STOKER = [sys.executable, "-c", "import sys; from stoker.cli import main; sys.exit(main())"]


def samples_of(url: str, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """(key, sha256 of the payload) of every sample of a packed dataset, in manifest order."""
    out = []
    for info in Manifest.load(url, storage_options).shards:
        with open_shard(storage.read_bytes(storage.join(url, info.name), storage_options), name=info.name) as reader:
            for batch in reader.iter_batches():
                payload = batch.column("image" if "image" in batch.schema.names else "tokens").to_pylist()
                out += [(k, hashlib.sha256(repr(p).encode()).hexdigest()) for k, p in zip(batch.column("key").to_pylist(), payload)]
    return out


def upload(local: Path, url: str, storage_options: dict | None = None) -> None:
    """Copy a local file or tree to `url`, keeping relative paths."""
    fs, root = storage.filesystem(url, storage_options)
    if local.is_file():
        fs.pipe_file(root, local.read_bytes())
        return
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def _pack(src: str, dst: str, **options) -> Manifest:
    return pack_dataset(src, dst, progress=False, **{"workers": 1, **options}).manifest


# ---- memory:// (no server) --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_url_source_packs_exactly_like_local_disk(image_tree: Path, text_corpus: Path, tmp_path: Path, workers: int) -> None:
    base = f"memory://src-{uuid.uuid4().hex[:8]}"
    upload(image_tree, f"{base}/images")
    upload(text_corpus, f"{base}/text/corpus.jsonl")
    local = _pack(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10)
    remote = _pack(f"{base}/images", str(tmp_path / "remote"), shard_size=32 << 10, workers=workers)
    assert len(local.shards) > 2
    assert [(s.name, s.sha256) for s in remote.shards] == [(s.name, s.sha256) for s in local.shards]
    assert remote.classes == local.classes
    text_local = _pack(str(text_corpus), str(tmp_path / "tl"), shard_size=8 << 10)
    text_remote = _pack(f"{base}/text", f"{base}/text-out", shard_size=8 << 10, workers=workers)  # folder of files
    assert [s.sha256 for s in text_remote.shards] == [s.sha256 for s in text_local.shards]
    assert samples_of(f"{base}/text-out") == samples_of(str(tmp_path / "tl"))
    assert verify(f"{base}/text-out") == []


def test_parallel_listing_orders_and_filters_like_the_local_walk(tmp_path: Path) -> None:
    names = ["cat/a-b.jpg", "cat/a/x.jpg", "cat/a/y.png", "cat/B.jpg", "cat/.hidden.jpg", "cat/.cache/z.jpg",
             "dog/1.jpg", "dog/readme.txt", ".trash/t.jpg", "empty/.keep"]
    base = f"memory://tree-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
        fs.pipe_file(f"{base.removeprefix('memory://')}/{name}", name.encode())
    local = images.list_image_tree(str(tmp_path), skip_errors=True)
    remote = images.list_image_tree(base, skip_errors=True)
    assert remote == local
    classes, items, skipped = remote
    assert classes == ["cat", "dog", "empty"]
    assert [i.key for i in items] == ["cat/B.jpg", "cat/a/x.jpg", "cat/a/y.png", "cat/a-b.jpg", "dog/1.jpg"]
    assert [i.size for i in items] == [len(i.key) for i in items]
    assert {s["path"] for s in skipped} == {"dog/readme.txt", "empty"}
    with pytest.raises(SourceError, match=r"memory://tree-\w+: 2 problems in SRC[^\n]*\n  dog/readme.txt: not an image file"):
        images.list_image_tree(base)


def test_file_list_with_and_without_sizes_round_trips(tmp_path: Path) -> None:
    listed = [listing.Listed("a/1.jpg", 10), listing.Listed("b/2.jpg", 20)]
    listing.write_file_list(str(tmp_path / "l.txt"), listed)
    assert listing.read_file_list(str(tmp_path / "l.txt")) == [("a/1.jpg", 10), ("b/2.jpg", 20)]
    (tmp_path / "m.txt").write_text("./a/1.jpg\n\nb/2.jpg\t7\n")
    assert listing.read_file_list(str(tmp_path / "m.txt")) == [("a/1.jpg", None), ("b/2.jpg", 7)]
    (tmp_path / "bad.txt").write_text("a/1.jpg\tten\n")
    with pytest.raises(SourceError, match=r"bad.txt:1: expected"):
        listing.read_file_list(str(tmp_path / "bad.txt"))


# ---- a source file that disappears between listing and reading ---------------------------------------------


@pytest.fixture(scope="module")
def s3():
    from stoker.testing import S3Server

    with S3Server() as server:
        server.create_bucket("stoker-pack")
        yield server


def _vanishing_src(kind: str, image_tree: Path, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict | None]:
    if kind == "local":
        return str(shutil.copytree(image_tree, tmp_path / "src")), None
    server = request.getfixturevalue("s3")
    url, so = f"s3://stoker-pack/vanish-{uuid.uuid4().hex[:8]}", server.storage_options()
    upload(image_tree, url, so)
    return url, so


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.remote)])
def test_source_file_deleted_after_listing_is_named_or_skipped(
    kind: str, image_tree: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, so = _vanishing_src(kind, image_tree, tmp_path, request)
    real = images.list_image_tree
    victim: list[str] = []

    def list_then_delete(*args, **kwargs):
        listed = real(*args, **kwargs)
        key = listed[1][5].key  # an image in the first shard, after the listing saw it
        fs, root = storage.filesystem(src, so)
        fs.rm_file(f"{root}/{key}")
        victim.append(key)
        return listed

    monkeypatch.setattr(images, "list_image_tree", list_then_delete)
    with pytest.raises(SourceError, match=r"disappeared after SRC was listed") as err:
        _pack(src, str(tmp_path / "raise"), source_options=so)
    assert victim[0] in str(err.value)
    assert not (tmp_path / "raise" / "manifest.json").exists()
    monkeypatch.setattr(images, "list_image_tree", real)  # the file is gone now; skipping lists it
    skipped = _pack(src, str(tmp_path / "skip"), on_error="skip", source_options=so)
    total = len(list(image_tree.rglob("*.jpg")))
    assert skipped.num_samples == total - 1
    assert victim[0] not in {k for k, _ in samples_of(str(tmp_path / "skip"))}
    monkeypatch.setattr(images, "list_image_tree", list_then_delete)
    victim.clear()
    again = _pack(src, str(tmp_path / "skip2"), on_error="skip", source_options=so)
    assert [s["path"] for s in again.skipped] == [victim[0]] and "disappeared" in again.skipped[0]["error"]
    assert again.num_samples == total - 2


# ---- s3:// on a real moto_server ---------------------------------------------------------------------------


@pytest.mark.remote
@pytest.mark.slow
def test_s3_source_to_s3_and_local_destinations_match_a_local_run(s3, image_tree: Path, text_corpus: Path, tmp_path: Path) -> None:
    so = s3.storage_options()
    base = f"s3://stoker-pack/same-{uuid.uuid4().hex[:8]}"
    upload(image_tree, f"{base}/raw", so)
    upload(text_corpus, f"{base}/corpus.jsonl", so)
    local = _pack(str(image_tree), str(tmp_path / "local"), shard_size=32 << 10)
    to_s3 = _pack(f"{base}/raw", f"{base}/packed", shard_size=32 << 10, workers=2, storage_options=so)
    to_disk = _pack(f"{base}/raw", str(tmp_path / "disk"), shard_size=32 << 10, source_options=so)
    assert [s.sha256 for s in to_s3.shards] == [s.sha256 for s in to_disk.shards] == [s.sha256 for s in local.shards]
    assert verify(f"{base}/packed", so) == []
    assert samples_of(f"{base}/packed", so) == samples_of(str(tmp_path / "local"))
    text = _pack(f"{base}/corpus.jsonl", f"{base}/text", shard_size=8 << 10, storage_options=so)  # one file, detected as text
    assert text.kind == "text"
    assert [s.sha256 for s in text.shards] == [s.sha256 for s in _pack(str(text_corpus), str(tmp_path / "t"), shard_size=8 << 10).shards]


@pytest.mark.remote
def test_files_from_works_for_an_s3_source(s3, image_tree: Path, tmp_path: Path) -> None:
    so = s3.storage_options()
    src = f"s3://stoker-pack/ff-{uuid.uuid4().hex[:8]}"
    upload(image_tree, src, so)
    files = sorted(p.relative_to(image_tree).as_posix() for p in image_tree.rglob("*.jpg"))[::2]
    plain, sized = tmp_path / "plain.txt", tmp_path / "sized.txt"
    plain.write_text("\n".join(files) + "\n")
    sized.write_text("".join(f"{f}\t{(image_tree / f).stat().st_size}\n" for f in files))
    expected = _pack(str(image_tree), str(tmp_path / "local"), files_from=str(plain))
    for listing_file in (plain, sized):
        got = _pack(src, str(tmp_path / listing_file.stem), files_from=str(listing_file), source_options=so)
        assert got.num_samples == len(files)
        assert [s.sha256 for s in got.shards] == [s.sha256 for s in expected.shards]
    upload(sized, f"{src}-lists/sized.txt", so)  # the list itself may live in the bucket
    remote_list = _pack(src, f"{src}-out", files_from=f"{src}-lists/sized.txt", storage_options=so)
    assert [s.sha256 for s in remote_list.shards] == [s.sha256 for s in expected.shards]
    everything = tmp_path / "all.txt"
    listing.write_file_list(str(everything), listing.list_tree(src, so))  # list once, pack many times
    full = _pack(src, str(tmp_path / "all"), files_from=str(everything), source_options=so)
    assert [s.sha256 for s in full.shards] == [s.sha256 for s in _pack(str(image_tree), str(tmp_path / "walk")).shards]
    plain.write_text("\n".join(files + [files[0].split("/")[0] + "/missing.jpg"]))
    with pytest.raises(SourceError, match=r"missing.jpg: listed in files_from but missing"):
        _pack(src, str(tmp_path / "bad"), files_from=str(plain), source_options=so)


# ---- a part SIGKILLed halfway, rerun, merged ----------------------------------------------------------------


def _env(s3_server) -> dict[str, str]:
    env = dict(os.environ)
    if s3_server is not None:  # the CLI takes S3 settings from the standard AWS variables
        env.update(AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
    return env


def _records(dst: str, state_dir: str, so: dict | None) -> int:
    fs, root = storage.filesystem(storage.join(dst, state_dir), so)
    fs.invalidate_cache()
    try:
        return len([p for p in fs.ls(root, detail=False) if p.endswith(".json")])
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=[pytest.mark.remote, pytest.mark.slow])])
def test_part_killed_halfway_is_rerun_and_merges_to_the_single_run(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("s3") if where == "s3" else None
    so = server.storage_options() if server else None
    # Each S3 shard costs a few requests, so fewer images still leave time to kill the part halfway.
    raw = make_image_tree(tmp_path / "raw", num_classes=2, per_class=30 if server else 60, min_side=48, max_side=96, seed=3)
    if server:
        src = dst = f"s3://stoker-pack/kill-{uuid.uuid4().hex[:8]}"
        upload(raw, src + "/raw", so)
        src, dst = src + "/raw", src + "/out"
    else:
        src, dst = str(raw), str(tmp_path / "out")
    shard_kb = 16 if server else 8
    args = ["--workers", "1", "--shard-size", f"{shard_kb}KB", "--quiet"]
    env = _env(server)
    assert subprocess.run([*PACK, src, dst, *args, "--part", "0/2"], env=env, timeout=120).returncode == 0
    victim = subprocess.Popen([*PACK, src, dst, *args, "--part", "1/2"], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _records(dst, ".stoker-pack-part-00001-of-00002", so) < 3:
        time.sleep(0.01)
    assert victim.poll() is None, "the part finished before it could be killed; make the input larger"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    with pytest.raises(ManifestError, match=r"part 1/2 is missing \(it is still running, or crashed: rerun it\)"):
        merge(dst, so)
    rerun = subprocess.run([*PACK, src, dst, *args, "--part", "1/2"], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "reused 0 finished shards" not in rerun.stdout  # it resumed from the killed run's finished shards
    merged = subprocess.run([*STOKER, "merge", dst], env=env, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    # The merge() above left a listing of DST in this process's s3fs cache, which would hide the new manifest.
    storage.filesystem(dst, so)[0].invalidate_cache()
    single = _pack(str(raw), str(tmp_path / "single"), shard_size=shard_kb << 10)
    assert [s.sha256 for s in Manifest.load(dst, so).shards] == [s.sha256 for s in single.shards]
    assert verify(dst, so) == []
    if not server:
        assert stoker_main(["verify", dst]) == 0
        assert not [p for p in os.listdir(dst) if ".tmp-" in p or p.startswith(".stoker-pack")]


# ---- the array-job examples ------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_slurm_example_submits_an_array_and_a_merge_and_its_tasks_pack(image_tree: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A stand-in for `sbatch` that records its arguments and answers with a job id.
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_LOG"\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch.log"))
    env.pop("SLURM_JOB_ID", None)
    script, dst = str(EXAMPLES / "slurm_pack.sh"), str(tmp_path / "out")
    submit = subprocess.run(["bash", script, str(image_tree), dst, "2", "--shard-size", "32KB"], env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    array, merge_job = (tmp_path / "sbatch.log").read_text().splitlines()
    assert array.startswith("--parsable --array=0-1 ") and array.endswith(f"{image_tree} {dst} 2 --shard-size 32KB")
    assert "--dependency=afterok:4242" in merge_job and "STOKER_MERGE=1" in merge_job
    for i in range(2):  # what Slurm then runs: each array task, then the merge
        task_env = dict(env, SLURM_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(i), SLURM_CPUS_PER_TASK="1")
        done = subprocess.run(["bash", script, str(image_tree), dst, "2", "--shard-size", "32KB"], env=task_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    merged = subprocess.run(["bash", script, str(image_tree), dst, "2"], env=dict(env, SLURM_JOB_ID="4243", STOKER_MERGE="1"),
                            capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0 and "merged 2 parts" in merged.stdout, merged.stderr
    single = _pack(str(image_tree), str(tmp_path / "single"), shard_size=32 << 10)
    assert [s.sha256 for s in Manifest.load(dst).shards] == [s.sha256 for s in single.shards]


def test_kubernetes_example_is_an_indexed_job_of_parts_and_a_merge() -> None:
    yaml = pytest.importorskip("yaml")
    pack_job, merge_job = yaml.safe_load_all((EXAMPLES / "k8s_pack_job.yaml").read_text())
    spec = pack_job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["PARTS"]) == spec["completions"]
    assert '--part "$JOB_COMPLETION_INDEX/$PARTS"' in container["args"][0]
    assert merge_job["spec"]["template"]["spec"]["containers"][0]["command"] == ["stoker", "merge", env["DST"]]
    assert {pack_job["metadata"]["labels"]["step"], merge_job["metadata"]["labels"]["step"]} == {"pack", "merge"}
