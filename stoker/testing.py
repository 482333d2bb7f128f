"""Helpers for tests and benchmarks (the library itself never imports this module).

A real object store on loopback with S3's shape: nginx over a directory, a first-byte delay and a per-connection
rate, readable as a path-style S3 endpoint (HEAD and ranged GET) and as plain http URLs.

    with ObjectStore("/data/packed", latency=0.02, rate=100e6) as store:
        StreamingDataset(store.url("s3"), storage_options=store.storage_options())
        StreamingDataset(store.url("http"))

nginx costs almost no CPU, so unlike a Python server it is not itself the limit: what a reader gets from it is what
its own parallelism allows (20 ms before every first byte, 100 MB/s per connection, as S3 roughly gives). It needs
Debian's `nginx-light` and `libnginx-mod-http-echo` (`make test` installs them). Read-only: writes, listings and
faults are what the moto-based tests are for: `S3Server` is a real S3 endpoint, `moto_server` in a subprocess on
127.0.0.1 (objects in memory; `kill()` simulates a crash, `restart()` brings an empty server back on the same port).

    with S3Server() as s3:
        s3.create_bucket("data")
        s3.upload_dir(local_dir, "s3://data/ds")
        StreamingDataset("s3://data/ds", storage_options=s3.storage_options())

    python -m stoker.testing DIR [--latency-ms 20] [--rate-mb 100] [--port 0]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

NGINX = "/usr/sbin/nginx"
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
KEY, SECRET, REGION = "testing", "testing", "us-east-1"
INSTALL_HINT = "install Debian's nginx-light, libnginx-mod-http-echo and openssl (`make test` does)"


def available(tls: bool = False) -> bool:
    """Whether nginx and its echo module (for the first-byte delay), and openssl for `tls`, are installed."""
    return os.path.exists(NGINX) and os.path.exists(ECHO_MODULE) and (not tls or shutil.which("openssl") is not None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that has the child receive `sig` when the process that started it dies (Linux; a no-op
    elsewhere), so a server started by a test never outlives it."""

    def preexec() -> None:  # runs in the child between fork and exec
        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return preexec


class ObjectStore:
    """nginx serving `directory` as bucket `bucket` on a free 127.0.0.1 port; `latency` seconds before every first
    byte, `rate` bytes/s per connection (0: unlimited)."""

    def __init__(self, directory: str | os.PathLike[str], *, latency: float = 0.02, rate: float = 100e6,
                 bucket: str = "data", port: int | None = None, workers: int = 2, tls: bool = False) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket {bucket!r} must be a plain name")
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no directory {self.directory} to serve")
        self.latency, self.rate, self.bucket, self.workers = float(latency), float(rate), bucket, int(workers)
        self.tls = tls  # https with a self-signed certificate for 127.0.0.1 (clients must not verify it)
        self.port = port or 0
        self._fixed_port = port  # None: a free port is picked at each start
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, scheme: str = "s3", path: str = "") -> str:
        """`s3://bucket/path`, or `http(s)://127.0.0.1:port/bucket/path` (scheme "http"), for `path` relative to the
        directory."""
        if scheme not in ("s3", "http"):
            raise ValueError(f"scheme must be 's3' or 'http', not {scheme!r}")
        path = path.strip("/")
        base = f"s3://{self.bucket}" if scheme == "s3" else f"{self.endpoint_url}/{self.bucket}"
        return f"{base}/{path}" if path else base

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options for this endpoint (any key and secret do; nginx checks none)."""
        client: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region_name": REGION}
        if self.tls:
            client["verify"] = False  # the certificate is self-signed
        return {"key": KEY, "secret": SECRET, "client_kwargs": client, **extra}

    def _config(self, port: int) -> str:
        assert self._tmp is not None
        tmp = self._tmp
        # echo_sleep takes at most three decimals (milliseconds).
        delay = f"echo_sleep {self.latency:.3f}; echo_exec @files;" if self.latency >= 0.0005 else "try_files $uri =404;"
        rate = f"limit_rate {int(self.rate)};" if self.rate > 0 else ""
        listen = f"127.0.0.1:{port} reuseport"
        tls = ""
        if self.tls:
            listen += " ssl"
            tls = f"ssl_certificate {tmp}/cert.pem; ssl_certificate_key {tmp}/key.pem;"
        return f"""
load_module {ECHO_MODULE};
daemon off;
user root;
worker_processes {self.workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    default_type application/octet-stream;
    server {{
        listen {listen};
        {tls}
        root {tmp}/root;
        location / {{ {delay} }}
        location @files {{ {rate} }}
        # A listing of the bucket (what s3fs asks after a HEAD answered 404) is always empty: listing and
        # writing are what the moto-based tests cover.
        location ~ ^/{self.bucket}/?$ {{
            default_type application/xml;
            return 200 '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{self.bucket}</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>';
        }}
    }}
}}
"""

    def start(self, timeout: float = 30.0) -> ObjectStore:
        """Start nginx and wait (at most `timeout` seconds) until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not available(self.tls):
            raise RuntimeError(f"no nginx with the echo module (or no openssl for https): {INSTALL_HINT}")
        self._tmp = tempfile.mkdtemp(prefix="stoker-store-")
        os.makedirs(os.path.join(self._tmp, "root"))
        os.symlink(self.directory, os.path.join(self._tmp, "root", self.bucket))
        if self.tls:
            self._make_certificate()
        last = ""
        for _ in range(5):  # a free port can be taken between the probe and nginx's bind: try another
            port = self._fixed_port or free_port()
            conf = os.path.join(self._tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(self._config(port))
            log = open(os.path.join(self._tmp, "stderr.log"), "wb")
            # Its own session, so that stop() can make sure no worker outlives the master.
            self.process = subprocess.Popen([NGINX, "-c", conf, "-p", self._tmp, "-e", os.path.join(self._tmp, "error.log")],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
            log.close()
            self.port = port
            if self._wait_ready(timeout):
                return self
            last = self._log_tail()
            self._kill()
        self.stop()
        raise RuntimeError(f"nginx did not start on 127.0.0.1: {last}")

    def _make_certificate(self) -> None:
        assert self._tmp is not None
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", os.path.join(self._tmp, "key.pem"),
                        "-out", os.path.join(self._tmp, "cert.pem")], check=True, capture_output=True, timeout=60)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                context = ssl._create_unverified_context() if self.tls else None  # our own self-signed certificate
                urllib.request.urlopen(f"{self.endpoint_url}/.stoker-ready", timeout=2, context=context).close()
                return True
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return True  # it answers, and a missing file is a 404: ready
                raise RuntimeError(f"nginx answers {exc.code} to a plain GET: {self._log_tail()}") from None
            except OSError:
                time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            try:
                with open(os.path.join(self._tmp or "", name), errors="replace") as f:
                    text += f.read()[-1000:]
            except OSError:
                pass
        return text.strip()

    def _kill(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # nginx's fast shutdown: the master stops its workers, then exits
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # any worker the master left behind
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """Stop nginx and its workers and remove its files; returns once they are gone."""
        self._kill()
        self.process = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> ObjectStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class S3Server:
    """moto_server on 127.0.0.1: start, stop, kill, restart; clients via `storage_options()` and `client()`."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        atexit.register(self.stop)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> S3Server:
        """Start the server and wait (at most `timeout` seconds) until it answers HTTP."""
        if self.process is not None and self.process.poll() is None:
            return self
        moto = Path(sys.executable).with_name("moto_server")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGKILL),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers: good enough
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server, as in a crash; returns once it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, timeout: float = 60.0) -> S3Server:
        """Kill and start again on the same port (with no buckets: moto keeps them in memory)."""
        self.kill()
        return self.start(timeout)

    def log_tail(self, chars: int = 2000) -> str:
        with open(self._log.name, "rb") as f:
            return f.read()[-chars:].decode(errors="replace")

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this server (dummy credentials, path-style loopback endpoint)."""
        return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
                **extra}

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name=REGION)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_dir(self, local_dir: str | os.PathLike[str], url: str) -> None:
        """Upload the files of `local_dir` (not recursive) to `s3://bucket/prefix`."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = self.client()
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.name}".lstrip("/"))

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        try:
            os.remove(self._log.name)
        except OSError:
            pass



@contextlib.contextmanager
def serving(local_dir: str | os.PathLike[str], url: str = "s3://data/ds") -> Iterator[S3Server]:
    """A running server whose bucket holds the files of `local_dir` under `url`, stopped on exit."""
    with S3Server() as server:
        server.create_bucket(url.removeprefix("s3://").partition("/")[0])
        server.upload_dir(local_dir, url)
        yield server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a directory as a loopback object store (nginx) until Ctrl-C.")
    parser.add_argument("directory")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay before every first byte")
    parser.add_argument("--rate-mb", type=float, default=100.0, help="MB/s per connection (0: unlimited)")
    parser.add_argument("--bucket", default="data")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    store = ObjectStore(args.directory, latency=args.latency_ms / 1000, rate=args.rate_mb * 1e6, bucket=args.bucket,
                        port=args.port or None)
    with store:
        print(f"serving {store.directory} at {store.endpoint_url} ({args.latency_ms:g} ms first byte, "
              f"{args.rate_mb:g} MB/s per connection)")
        print(f"  s3:   {store.url('s3')}  storage_options={store.storage_options()}")
        print(f"  http: {store.url('http')}", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM}) if hasattr(signal, "sigwait") else time.sleep(1e9)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
