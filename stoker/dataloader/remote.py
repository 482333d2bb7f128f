"""Remote shards into the local cache at the object store's speed.

An object store answers each request after tens of milliseconds and carries about 100 MB/s per connection, so a
reader keeps up only with many ranged reads in flight: bandwidth x latency bytes, plus enough connections to sum to
the bandwidth. `RemoteShards` downloads shards into the `ShardCache` as parts of `ReadOptions.part_size`, up to
`parallel_reads` of them in flight per shard, for the shard being read and the prefetched ones at once
(`prefetch_shards + 1` shards per process).

The ranged reads go through obstore (Rust's `object_store`) where it can serve the URL: its requests run without
the GIL, so a worker's download threads do not queue behind each other or behind the worker's own batch work
(s3fs's event loop thread is one Python thread for all of them). The user still passes fsspec URLs and s3fs's
`storage_options`; options obstore cannot take (a profile, unknown keys, credentials in an http URL), other
protocols (gs://, az://, memory://) and processes forked from one that already used obstore (its runtime's threads
do not survive a fork) read through fsspec, with the same retries, timeouts and errors.

The manifest goes through the same client (`manifest_reader`), so a remote dataset opens without importing s3fs
and botocore (0.3-1.2 s in a fresh process). On Linux its read runs in a short-lived child forked for it: obstore's runtime
never starts in the training process, and the DataLoader workers forked from it later can still use obstore.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from stoker import cache, storage
from stoker.dataloader import partial
from stoker.formats import integrity
from stoker.formats.manifest import Manifest

# obstore's runtime threads do not survive a fork: a process forked while they ran (by stoker or anyone else in the
# parent) hangs on its first request. Whether they ran is looked up at each fork, in the parent.
_runtime_at_fork: list[bool] = [False]
_obstore_unusable: list[bool] = [False]


def _runtime_running() -> bool:
    if "obstore" not in sys.modules:
        return False
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm") as comm:
                if "tokio" in comm.read():
                    return True
        return False
    except OSError:
        return True  # no /proc: assume it ran


def _before_fork() -> None:
    _runtime_at_fork[0] = _runtime_running()


def _after_fork_in_child() -> None:
    _obstore_unusable[0] = _obstore_unusable[0] or _runtime_at_fork[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


MIN_PART = 1 << 20  # bytes: smaller parts cost more in requests than they save in time
ROW_READS = 16  # calls reading rows at once per process, each with up to 10 ranges in flight (`partial.PER_CALL`)

# s3fs options that have an obstore equivalent; any other key keeps the read on fsspec, which understands it.
_S3_KEYS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs"}
_S3_CLIENT_KWARGS = {"endpoint_url", "region_name", "verify"}
_S3_CONFIG_KWARGS = {"connect_timeout", "read_timeout", "retries", "max_pool_connections", "s3"}


class RangeClient:
    """Reads byte ranges of the objects under one URL prefix; `name` says which client does it."""

    def __init__(self, name: str, read: Callable[[str, int, int], Any],
                 read_many: Callable[[str, list[int], list[int]], list[Any]]) -> None:
        self.name = name
        self._read, self._read_many = read, read_many

    def read(self, path: str, start: int, end: int) -> Any:
        """Bytes [start, end) of object `path` (relative to the prefix) as a buffer; a short read is an error."""
        return _exact(path, start, end, self._read(path, start, end))

    def read_many(self, path: str, spans: list[tuple[int, int]]) -> list[Any]:
        """Several byte ranges of object `path`, read concurrently by the client (no thread of ours each)."""
        got = self._read_many(path, [a for a, _ in spans], [z for _, z in spans])
        return [_exact(path, a, z, data) for (a, z), data in zip(spans, got, strict=True)]


def _exact(path: str, start: int, end: int, data: Any) -> Any:
    if len(data) != end - start:
        raise EOFError(f"{path}: asked for bytes {start}-{end}, got {len(data)} bytes")
    return data


def range_client(url: str, storage_options: dict[str, Any] | None, *, connect_timeout: float,
                 read_timeout: float, pool: int) -> RangeClient:
    """The fastest client that can read the objects under `url` with these options (obstore, else fsspec)."""
    store = _obstore_for(url, storage_options or {}, connect_timeout, read_timeout, pool)
    if store is not None:
        import obstore

        def read_obstore(path: str, start: int, end: int) -> Any:
            return obstore.get_range(store, path, start=start, end=end)

        def read_many_obstore(path: str, starts: list[int], ends: list[int]) -> list[Any]:
            # Up to 10 requests in flight within obstore; ranges are already merged where that pays (`partial`).
            return obstore.get_ranges(store, path, starts=starts, ends=ends, coalesce=0)

        return RangeClient("obstore", read_obstore, read_many_obstore)
    options = storage.remote_options(url, storage_options, connect_timeout=connect_timeout, read_timeout=read_timeout)
    fs, root = storage.filesystem(url, options)

    def read_fsspec(path: str, start: int, end: int) -> Any:
        return fs.cat_file(storage.join(root, path), start=start, end=end)

    def read_many_fsspec(path: str, starts: list[int], ends: list[int]) -> list[Any]:
        return fs.cat_ranges([storage.join(root, path)] * len(starts), starts, ends, on_error="raise")

    return RangeClient("fsspec", read_fsspec, read_many_fsspec)


def manifest_reader(url: str, storage_options: dict[str, Any] | None, *, connect_timeout: float,
                    read_timeout: float) -> Callable[[str, int], bytes | None] | None:
    """A reader of the manifest of the dataset at `url` (its directory or the file) through obstore, as
    `Manifest.load` takes it (the file's bytes, None when larger than the limit, FileNotFoundError when missing);
    None where fsspec must read it."""
    base = url.rsplit("/", 1)[0] if url.endswith(".json") else url  # the dataset's directory, or the file's
    store = _obstore_for(base, storage_options or {}, connect_timeout, read_timeout, 1)
    if store is None:
        return None
    prefix = base.rstrip("/") + "/"
    # Forked workers can use obstore only if its runtime never ran here: read in a child unless it already did.
    # Elsewhere than Linux workers are spawned by default (and forking a macOS process is unsafe): read here.
    in_child = sys.platform.startswith("linux") and not _runtime_running()
    deadline = 2 * (connect_timeout + read_timeout)

    def read(path: str, limit: int) -> bytes | None:
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {url}")
        name = path[len(prefix):]
        if not in_child:
            return _read_capped(store, name, limit)
        return _in_child(lambda: _read_capped(store, name, limit), deadline, f"reading {storage.redact(path)}")

    return read


def _read_capped(store: Any, name: str, limit: int) -> bytes | None:
    import obstore

    try:
        # One request: the size comes with the response's headers, before its body is read (or left unread).
        result = obstore.get(store, name)
        if result.meta["size"] > limit:
            return None
        return bytes(result.bytes())
    except FileNotFoundError:
        raise
    except Exception as exc:  # obstore's own classes: the ones the callers act on, as builtins
        kind = type(exc).__name__
        if kind == "NotFoundError":
            raise FileNotFoundError(str(exc)) from None
        if kind in ("PermissionDeniedError", "UnauthenticatedError"):
            raise PermissionError(str(exc)) from None
        raise


def _in_child(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """`fn()` run in a forked child; its result or its exception (as a builtin OSError of the same kind) comes back
    through a pipe. The child is killed after `timeout` seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        try:
            os.close(r)
            try:
                payload = pickle.dumps((True, fn()))
            except BaseException as exc:
                error = FileNotFoundError if isinstance(exc, FileNotFoundError) else (
                    PermissionError if isinstance(exc, PermissionError) else OSError)
                payload = pickle.dumps((False, error(storage.redact_text(f"{type(exc).__name__}: {exc}"))))
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks, end = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"{what}: no answer within {timeout:.0f}s")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise OSError(f"{what}: the process reading it ended without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise value
    return value


def _obstore_for(url: str, options: dict[str, Any], connect_timeout: float, read_timeout: float,
                 pool: int) -> Any | None:
    """An obstore store for the prefix `url`, or None where fsspec must read it."""
    if _obstore_unusable[0]:
        return None  # forked from a process whose obstore runtime was running: its threads are not here
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in ("s3", "s3a", "http", "https"):
        return None
    try:
        from obstore.store import HTTPStore, S3Store
    except ImportError:
        return None
    client = {"connect_timeout": f"{connect_timeout}s", "timeout": f"{read_timeout}s",
              "pool_max_idle_per_host": str(max(pool, 1))}
    retry = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=read_timeout)}  # stoker retries itself
    if protocol in ("http", "https"):
        # Credentials in the URL, headers or other client options: fsspec's http filesystem knows what they mean.
        if options or "@" in url.split("://", 1)[1].split("/", 1)[0] or "?" in url or "#" in url:
            return None
        if protocol == "http":
            client["allow_http"] = "true"
        return HTTPStore.from_url(url.rstrip("/") + "/", client_options=client, retry_config=retry)
    return _s3_store(S3Store, url, options, client, retry)


def _s3_store(S3Store: Any, url: str, options: dict[str, Any], client: dict[str, str],
              retry: dict[str, Any]) -> Any | None:
    client_kwargs = dict(options.get("client_kwargs") or {})
    config_kwargs = dict(options.get("config_kwargs") or {})
    if set(options) - _S3_KEYS or set(client_kwargs) - _S3_CLIENT_KWARGS or set(config_kwargs) - _S3_CONFIG_KWARGS:
        return None
    if set(config_kwargs.get("s3") or {}) - {"addressing_style"} or client_kwargs.get("verify") not in (None, True, False):
        return None  # other botocore S3 settings, or a CA bundle: botocore knows them
    for name in ("connect_timeout", "read_timeout"):  # the caller's own settings win, as they do for s3fs
        if name in config_kwargs:
            client["connect_timeout" if name == "connect_timeout" else "timeout"] = f"{float(config_kwargs[name])}s"
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    if not bucket:
        return None
    config: dict[str, Any] = {}
    endpoint = (client_kwargs.get("endpoint_url") or options.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    region = (client_kwargs.get("region_name") or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION"))
    if endpoint:
        config["endpoint"] = endpoint
        style = (config_kwargs.get("s3") or {}).get("addressing_style", "path")
        config["virtual_hosted_style_request"] = style == "virtual"  # botocore uses paths for custom endpoints
        if endpoint.startswith("http://"):
            client["allow_http"] = "true"
        region = region or "us-east-1"
    elif not region:
        return None  # s3fs asks the bucket where it lives; obstore would need the region given
    config["region"] = region
    if client_kwargs.get("verify") is False:
        client["allow_invalid_certificates"] = "true"
    if options.get("anon"):
        config["skip_signature"] = True
    elif options.get("key") and options.get("secret"):
        config["access_key_id"] = options["key"]
        config["secret_access_key"] = options["secret"]
        if options.get("token"):
            config["session_token"] = options["token"]
    elif not os.environ.get("AWS_ACCESS_KEY_ID") and (
            os.environ.get("AWS_PROFILE") or os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
            or os.path.exists(os.path.expanduser("~/.aws/credentials"))
            or os.path.exists(os.path.expanduser("~/.aws/config"))):
        return None  # profiles and SSO: botocore's chain (through s3fs) reads them
    # Otherwise obstore reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, web identity, ECS and
    # instance credentials from the environment, as botocore does.
    return S3Store(bucket, prefix=prefix.strip("/") or None, config=config, client_options=client,
                   retry_config=retry)


class RemoteShards:
    """Downloads the shards of one remote dataset into the cache, in the background, with parallel ranged reads."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict[str, Any] | None,
                 shard_cache: cache.ShardCache, options: Any) -> None:
        self.url = url
        self.manifest = manifest
        self.options = options
        self.cache = shard_cache
        # When the readers check every sample against its own checksum (the same rule as theirs), hashing the whole
        # shard as it is downloaded (sha256: about 0.5 CPU-s per GB, a fifth of the cold path's CPU here) would only
        # find again what those checks find; the download still insists on every byte of the shard's size.
        # Without per-sample checks (format 1, or checksums=False) the whole-shard sha256 stays.
        self._samples_checked = bool(integrity.checked_columns(manifest.schema, options.checksums))
        # Every part in flight holds a thread (blocked in the client, without the GIL under obstore): the budget
        # is per process, shared by the shard being read and the prefetched ones.
        in_flight = options.parallel_reads * (options.prefetch_shards + 1)
        self._parts = cache.IOPool(in_flight, "stoker-read")
        self._fetchers = cache.IOPool(options.prefetch_shards + 1, "stoker-prefetch")
        # Rows read ahead of their shard's download (`partial`) are small reads: their own threads, so that they
        # do not queue behind the parts of whole shards.
        self._row_reads = cache.IOPool(ROW_READS, "stoker-rows")
        # Rows needed now come first: no part of a large whole shard starts from `read_rows` to `resume`.
        self._rows_done = threading.Event()
        self._rows_done.set()
        self.client = range_client(url, storage_options, connect_timeout=options.connect_timeout,
                                   read_timeout=options.read_timeout,
                                   pool=in_flight + ROW_READS)

    def submit(self, shard: int) -> cf.Future[str]:
        """Start fetching `shard` into the cache; the future gives its local path."""
        return self._fetchers.submit(self.fetch, shard)

    def fetch(self, shard: int) -> str:
        """Local path of the complete, verified shard, downloading it into the cache if needed."""
        info = self.manifest.shards[shard]
        key = self._key(shard)
        where = f"shard {info.name} ({storage.redact(storage.join(self.url, info.name))})"
        deadline = time.monotonic() + self.options.shard_timeout
        opts = self.options

        held = self.holds(shard)
        # A shard of fewer than `parallel_reads` parts is split into that many (of at least MIN_PART): one
        # connection carries ~100 MB/s, so a small shard in one part would take its whole size / 100 MB/s.
        part_size = min(opts.part_size, max(MIN_PART, -(-info.bytes // opts.parallel_reads)))

        def read(start: int, end: int) -> Any:
            if held:
                self._rows_done.wait(opts.read_timeout)
            return self.client.read(info.name, start, end)

        def fetch(dst: str, sha256: bool = True) -> str:
            return cache.download(read, dst, info.bytes, pool=self._parts, part_size=part_size,
                                  parallel=opts.parallel_reads, attempts=opts.attempts, backoff=opts.backoff,
                                  deadline=deadline, what=where, sha256=sha256)

        def fill(tmp: str) -> None:
            if self._samples_checked:
                fetch(tmp, sha256=False)
            else:
                cache.fill_verified(tmp, fetch, info.sha256, info.name, where)

        return self.cache.get(key, info.bytes, fill, timeout=2 * opts.shard_timeout)

    def read_rows(self, wanted: dict[partial.PartialShard, Any], hold: bool = True) -> None:
        """Read the `wanted` rows (numpy arrays of row numbers) of each partial shard, within the options' bounds.
        No further part of a whole shard starts while they are read and, with `hold`, until `resume`: the batch
        these rows are for is made first, with the CPU to itself."""
        opts = self.options

        def read(shard: partial.PartialShard, spans: list[tuple[int, int]]) -> list[Any]:
            where = f"shard {shard.name} ({storage.redact(storage.join(self.url, shard.name))}): reading rows"
            return cache.retry(lambda: self.client.read_many(shard.name, spans), attempts=opts.attempts,
                               backoff=opts.backoff, deadline=deadline, what=where)

        deadline = time.monotonic() + opts.shard_timeout
        self._rows_done.clear()
        try:
            partial.fetch_rows(wanted, read, self._row_reads, deadline)
        except BaseException:
            self.resume()
            raise
        if not hold:
            self.resume()

    def holds(self, shard: int) -> bool:
        """Whether `read_rows` holds back the download of `shard`: only shards large enough to have rows read by
        themselves are held (`ReadOptions.early_min_bytes`); smaller ones are read whole at once."""
        least = self.options.early_min_bytes
        return least is not None and self.manifest.shards[shard].bytes >= least

    def resume(self) -> None:
        """Let the parts of whole shards start again (after `read_rows`)."""
        self._rows_done.set()

    def cached(self, shard: int) -> bool:
        """Whether the cache holds `shard` complete (it may still be evicted before it is opened)."""
        return self.cache.complete(self._key(shard), self.manifest.shards[shard].bytes)

    def _key(self, shard: int) -> str:
        info = self.manifest.shards[shard]
        return f"{info.sha256[:32]}-{info.name}"

    def wait(self, future: cf.Future[str], name: str) -> str:
        """The local path a `submit` future gives, within the options' bound."""
        return cache.wait(future, time.monotonic() + 2 * self.options.shard_timeout + 1, f"shard {name}")

    def close(self) -> None:
        self._row_reads.close()
        self._parts.close()
        self._fetchers.close()

