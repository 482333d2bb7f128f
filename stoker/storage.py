"""All storage access goes through fsspec here: URL handling, whole-file and ranged reads, atomic publish."""

from __future__ import annotations

import ctypes
import os
import re
import uuid
from typing import Any

import fsspec
import fsspec.asyn
from fsspec.core import url_to_fs

from stoker.errors import ConfigError, MissingExtraError

_PROTOCOL_EXTRAS = {"s3": ("s3", "s3fs"), "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs")}


# A forked DataLoader worker inherits the parent's fsspec filesystems and the record of their event loop, but not
# the loop's thread. fsspec drops those instances in the child; s3fs's finalizer then asks the dead loop to close
# the session and waits out fsspec's 1 s polling step: every worker's first S3 read came 1 s late. Marking the
# inherited loop as stopped makes the finalizer close the sockets directly; the sessions it leaves behind belong to
# the parent, so the dead loop's reports about them ("Unclosed client session") are dropped, not logged.
_loop_at_fork: list[Any] = [None]


def _remember_loop() -> None:
    _loop_at_fork[0] = fsspec.asyn.loop[0]


def _stop_inherited_loop() -> None:
    loop = _loop_at_fork[0]
    if loop is not None and hasattr(loop, "_thread_id"):
        loop._thread_id = None  # what asyncio's is_running() reads; the thread that ran it is not in this process
        loop.set_exception_handler(_ignore)
    _loop_at_fork[0] = None


def _ignore(loop: Any, context: dict[str, Any]) -> None:
    pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_remember_loop, after_in_child=_stop_inherited_loop)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    return url.removeprefix("file://")


def join(base: str, name: str) -> str:
    """Join a directory URL and a file name without losing the protocol."""
    return base.rstrip("/") + "/" + name


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for `url`; a missing protocol package names its extra."""
    _refuse_object_store_userinfo(url)
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra, package = _PROTOCOL_EXTRAS.get(protocol, (protocol, protocol + "fs"))
        raise MissingExtraError(f"reading {protocol}:// URLs", extra, package) from exc


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole (small) file."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        # Object stores' listing caches can predate a file another process wrote since; look again once.
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return fs.cat_file(path)


def redact(url: str) -> str:
    """The URL without credentials (user:password@ or query-string secrets), safe for logs and errors."""
    if _object_store_userinfo(url):  # a secret may hold "/": everything up to the last "@" goes
        scheme, _, rest = url.partition("://")
        path, query, params = rest.partition("?")
        url = f"{scheme}://{path.rsplit('@', 1)[1]}{query}{params}"
    url = re.sub(r"//[^/@]*@", "//", url)
    return re.sub(r"(?i)([?&](?:[a-z_-]*(?:key|token|secret|signature|credential)[a-z_-]*)=)[^&]*", r"\1***", url)


# Object-store clients take no credentials from a URL: they read `KEY:SECRET@bucket` as a bucket name and quote it
# in their errors ("Invalid bucket name ..."), so such a URL is refused before any client sees it.
_NO_USERINFO = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "r2")


def _object_store_userinfo(url: str) -> bool:
    # Bucket and container names hold neither ":" nor "@": either one in the first segment is userinfo.
    scheme, sep, rest = url.partition("://")
    head = rest.split("/", 1)[0]
    return bool(sep) and scheme.lower() in _NO_USERINFO and (":" in head or "@" in head) and "@" in rest


def _refuse_object_store_userinfo(url: str) -> None:
    if _object_store_userinfo(url):
        scheme = url.partition("://")[0]
        raise ConfigError(f"{redact(url)}: credentials in a {scheme}:// URL are not supported (and would be "
                          "sent as part of the bucket name); pass them in storage_options instead")


def redact_text(text: str) -> str:
    """Any text (a client library's error message) with the credentials of the URLs in it removed."""
    text = re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@", r"\1", text)
    text = re.sub(r"(?<=[\s'\"(])[^\s/@'\"():]+:[^\s/@'\"]*@", "", text)  # KEY:SECRET@bucket quoted without a scheme
    return re.sub(r"(?i)([?&](?:[a-z_-]*(?:key|token|secret|signature|credential)[a-z_-]*)=)[^&\s'\"]*", r"\1***",
                  text)


def temp_name(name: str) -> str:
    """A hidden, per-writer unique temporary name for `name`; completed files are renamed from it."""
    return f".{name}.tmp-{uuid.uuid4().hex[:12]}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def publish_local(tmp_path: str, dst_url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Make a finished local file durable and visible at `dst_url` atomically (fsync + rename, or a single PUT)."""
    if is_local(dst_url):
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())  # of whichever process wrote it: fsync flushes the file, not a descriptor
        os.replace(tmp_path, local_path(dst_url))
        return
    fs, path = filesystem(dst_url, storage_options)
    fs.put_file(tmp_path, path)
    os.remove(tmp_path)


def _libc_sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a file range to disk now, without waiting (Linux; elsewhere a no-op).

    Linux otherwise keeps written pages dirty for up to 30 s, so the fsync that publishes a shard would start
    the disk on all of it only then; started as each record batch is written, the disk works alongside.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: a failure changes nothing


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a small file so that readers see either the old or the new content, never a torn one."""
    if is_local(url):
        path = local_path(url)
        tmp = os.path.join(os.path.dirname(path) or ".", temp_name(os.path.basename(path)))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(path, data)


def remote_options(
    url: str, storage_options: dict[str, Any] | None, *, connect_timeout: float, read_timeout: float
) -> dict[str, Any]:
    """`storage_options` plus explicit connect/read timeouts and bounded client retries for s3 and http(s).

    Library defaults can wait minutes on a dead endpoint; the reader bounds every request and retries itself.
    Options the caller set win.
    """
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect_timeout)
        config.setdefault("read_timeout", read_timeout)
        # One attempt per call: the reader retries with its own backoff and deadline, and botocore's standard
        # mode would multiply them (seconds of sleeps per request against a dead endpoint).
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        config.setdefault("max_pool_connections", 32)
        options["config_kwargs"] = config
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout))
        options["client_kwargs"] = client
    return options

