"""The loopback object store (nginx with S3's first-byte delay and per-connection rate) and remote reads through it:
a packed dataset read over s3:// (path-style endpoint) and http:// gives exactly the packed samples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import psutil
import pytest

from stoker.synthetic import make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.dataloader import ReadOptions

pytestmark = pytest.mark.remote


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("store-src") / "ds", rows=(30, 25, 40, 5, 20), payload=(100, 3000),
                        seed=3)


def samples(loader) -> dict[str, tuple[int, bytes]]:
    """key -> (label, image bytes) of every sample the loader delivers; a key delivered twice fails."""
    out: dict[str, tuple[int, bytes]] = {}
    for batch in loader:
        for key, label, image in zip(batch["key"], batch["label"].tolist(), batch["image"]):
            assert key not in out, f"{key} delivered twice"
            out[key] = (label, bytes(image))
    return out


def test_ranged_get_head_and_missing_objects_over_s3_and_http(tmp_path, object_store):
    import fsspec
    import s3fs

    blob = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(blob)
    store = object_store(tmp_path, latency=0.005, rate=50e6)
    s3 = s3fs.S3FileSystem(**store.storage_options())
    assert s3.info("data/blob")["size"] == len(blob)
    assert s3.cat_file("data/blob", start=1000, end=70_000) == blob[1000:70_000]
    assert s3.cat_file("data/blob") == blob
    with pytest.raises(FileNotFoundError):
        s3.info("data/missing")
    http = fsspec.filesystem("http")
    assert http.cat_file(store.url("http", "blob"), start=5, end=105) == blob[5:105]
    with pytest.raises(FileNotFoundError):
        http.cat_file(store.url("http", "missing"), start=0, end=10)


def test_stop_leaves_no_process_and_no_file(tmp_path, object_store):
    store = object_store(tmp_path, latency=0.001)
    master = psutil.Process(store.process.pid)
    nginx = [master, *master.children(recursive=True)]
    assert len(nginx) == 1 + store.workers and all(p.name() == "nginx" for p in nginx)
    files = store._tmp
    store.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in nginx)
    assert not os.path.exists(files)
    with pytest.raises(OSError):
        urllib.request.urlopen(store.endpoint_url + "/data/", timeout=2)


def test_the_command_line_serves_until_interrupted(tmp_path):
    from stoker.testing import available

    if not available():
        pytest.skip("no nginx with the echo module")
    (tmp_path / "hello.txt").write_bytes(b"hello")
    proc = subprocess.Popen([sys.executable, "-m", "stoker.testing", str(tmp_path), "--latency-ms", "1"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving "), first
        endpoint = first.split(" at ")[1].split()[0]
        with urllib.request.urlopen(endpoint + "/data/hello.txt", timeout=10) as resp:
            assert resp.read() == b"hello"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_packed_dataset_streams_exactly_through_the_store(local, tmp_path, object_store, scheme):
    store = object_store(os.path.dirname(local), latency=0.01, rate=100e6)
    options = store.storage_options() if scheme == "s3" else None
    expected = samples(DataLoader(StreamingDataset(local, shuffle=False), batch_size=8))
    assert len(expected) == 120
    ds = StreamingDataset(store.url(scheme, "ds"), storage_options=options, cache_dir=str(tmp_path / "cache"),
                          shuffle_buffer=50, seed=1, read=ReadOptions(part_size=8192))
    got = samples(DataLoader(ds, batch_size=8, num_workers=2))
    assert got == expected


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_packed_dataset_streams_exactly_over_https(local, tmp_path, object_store, scheme):
    store = object_store(os.path.dirname(local), latency=0.002, tls=True)
    assert store.endpoint_url.startswith("https://")
    # A self-signed certificate: s3 options say verify=False (obstore then accepts it), http ones ssl=False (aiohttp).
    options = store.storage_options() if scheme == "s3" else {"ssl": False}
    if scheme == "s3":
        from stoker.dataloader.remote import range_client

        client = range_client(store.url("s3"), options, connect_timeout=2, read_timeout=5, pool=2)
        assert client.name == "obstore" and bytes(client.read("ds/manifest.json", 0, 1)) == b"{"
    expected = samples(DataLoader(StreamingDataset(local, shuffle=False), batch_size=8))
    ds = StreamingDataset(store.url(scheme, "ds"), storage_options=options, cache_dir=str(tmp_path / "cache"),
                          shuffle_buffer=50, seed=2)
    assert samples(DataLoader(ds, batch_size=8, num_workers=2)) == expected
