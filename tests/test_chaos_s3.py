"""Chaos against a real S3 endpoint (moto_server on loopback): a fault-injecting proxy, two jobs on one cache.

Run as a script, this file is the proxy: `python test_chaos_s3.py PROXY_PORT TARGET_PORT SEED RATE`. It forwards
HTTP to moto and, for a seeded `RATE` share of requests, answers 503 SlowDown, resets the connection, or delays the
request. Each test runs real processes and is bounded in time; after each, every sample of the epoch was delivered
exactly once (or the test fails).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ALL = [f"{i:06d}" for i in range(160)]


# -- the proxy (runs in its own process) ------------------------------------------------------------------------------

def serve_proxy(port: int, target: int, seed: int, rate: float) -> None:
    rng = random.Random(seed)
    lock = threading.Lock()
    counts = {"requests": 0, "error": 0, "reset": 0, "delay": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/__faults__":
                self._reply(200, {"Content-Type": "application/json"}, json.dumps(counts).encode())
                return
            with lock:
                counts["requests"] += 1
                roll, kind = rng.random(), rng.choice(["error", "reset", "delay"])
                fault = kind if roll < rate else None
                if fault:
                    counts[fault] += 1
            if fault == "error":
                xml = b"<Error><Code>SlowDown</Code><Message>injected by the chaos proxy</Message></Error>"
                self._reply(503, {"Content-Type": "application/xml"}, xml)
                return
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.close_connection = True
                self.connection.close()
                return
            if fault == "delay":
                time.sleep(0.3)
            conn = http.client.HTTPConnection("127.0.0.1", target, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {k: v for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                self._reply(resp.status, out, data, head=self.command == "HEAD",
                            length=resp.getheader("Content-Length"))
            finally:
                conn.close()

        def _reply(self, status: int, headers: dict, data: bytes, head: bool = False, length: str | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", length if head and length is not None else str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # die with the test process
    serve_proxy(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    sys.exit(0)


# -- tests -------------------------------------------------------------------------------------------------------------

from stoker.synthetic import keys_of, make_dataset
from stoker.testing import free_port, serving

pytestmark = [pytest.mark.remote, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("chaos-src"), rows=(20,) * 8, payload=(2000, 6000))


@pytest.fixture(scope="module")
def s3(local):
    with serving(local) as server:
        yield server


def shard_bytes(local) -> int:
    from stoker.formats.manifest import Manifest

    return max(s.bytes for s in Manifest.load(local).shards)


@pytest.fixture
def proxy(s3):
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port), str(s3.port), "1234", "0.2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url + "/__faults__", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the fault proxy did not start")
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait(10)


def test_twenty_percent_failed_or_delayed_requests_still_deliver_every_sample_once(s3, local, proxy, tmp_path):
    from stoker import DataLoader, StreamingDataset
    from stoker.dataloader import ReadOptions

    options = s3.storage_options()
    options["client_kwargs"] = dict(options["client_kwargs"], endpoint_url=proxy)
    read = ReadOptions(prefetch_shards=1, part_size=4096, parallel_reads=4, attempts=8, backoff=0.02,
                       connect_timeout=2, read_timeout=5, shard_timeout=60)
    ds = StreamingDataset("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "cache"),
                          shuffle_buffer=20, read=read, cache_limit=5 * shard_bytes(local))  # small: evicts, refetches
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    for epoch in range(2):
        ds.set_epoch(epoch)
        keys = keys_of(list(loader))
        assert sorted(keys) == ALL, f"epoch {epoch}"
    with urllib.request.urlopen(proxy + "/__faults__", timeout=5) as resp:
        faults = json.loads(resp.read())
    assert faults["error"] + faults["reset"] > 0 and faults["delay"] > 0, faults  # the chaos really happened
    print("proxy faults:", faults)


JOB = textwrap.dedent("""
    import json, sys
    from stoker.synthetic import keys_of
    from stoker import DataLoader, StreamingDataset
    from stoker.dataloader import ReadOptions
    options = json.loads(sys.argv[1])
    ds = StreamingDataset("s3://data/ds", storage_options=options, cache_dir=sys.argv[2], shuffle_buffer=20,
                          seed=int(sys.argv[3]), cache_limit=int(sys.argv[4]),
                          read=ReadOptions(prefetch_shards=1, part_size=8192, attempts=4, backoff=0.05,
                                           connect_timeout=2, read_timeout=5, shard_timeout=60))
    loader = DataLoader(ds, batch_size=10, num_workers=2)
    out = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        out.append(keys_of(list(loader)))
    print(json.dumps(out))
""")


def test_two_jobs_share_one_small_cache_directory(s3, local, tmp_path):
    cache = tmp_path / "shared-cache"
    limit = 5 * shard_bytes(local)  # 8 shards do not fit: both jobs evict while the other reads
    script = JOB
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(s3.storage_options()), str(cache), str(seed),
                               str(limit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for seed in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    for epochs in results:
        assert len(epochs) == 3
        for keys in epochs:
            assert sorted(keys) == ALL
    assert results[0][0] != results[1][0]  # different seeds: the jobs really read in different orders
    names = os.listdir(cache)
    assert not [n for n in names if ".tmp-" in n]  # no torn or orphaned downloads left behind
    total = sum(os.path.getsize(cache / n) for n in names if (cache / n).is_file())
    # The limit is soft by the fills in flight: each fill makes room for itself, then downloads; at most
    # 2 jobs x 2 workers x (prefetch_shards + 1) fetchers fill at once.
    assert total <= limit + 2 * 2 * 2 * shard_bytes(local)
