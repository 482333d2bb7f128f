"""A real S3 endpoint for tests and benchmarks: `moto_server` in a subprocess on 127.0.0.1, at a free port.

    with S3Server() as s3:
        s3.create_bucket("data")
        s3.upload_dir(local_dir, "s3://data/ds")
        StreamingDataset("s3://data/ds", storage_options=s3.storage_options())

The server keeps its objects in memory: `kill()` simulates a crash, `restart()` brings an empty server back on the
same port. It dies with the process that started it (Linux parent-death signal, plus `stop()` on exit), and every
wait for it is bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from stoker.testing import KEY, REGION, SECRET, die_with_parent, free_port


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
