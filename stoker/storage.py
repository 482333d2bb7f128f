"""All storage access goes through fsspec here: URL handling, whole-file and ranged reads, atomic publish."""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from stoker.errors import MissingExtraError

_PROTOCOL_EXTRAS = {"s3": ("s3", "s3fs"), "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs")}


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    """Join a directory URL and a file name without losing the protocol."""
    return base.rstrip("/") + "/" + name


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for `url`; a missing protocol package names its extra."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra, package = _PROTOCOL_EXTRAS.get(protocol, (protocol, protocol + "fs"))
        raise MissingExtraError(f"reading {protocol}:// URLs", extra, package) from exc


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole (small) file."""
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def redact(url: str) -> str:
    """The URL without credentials (user:password@ or query-string secrets), safe for logs and errors."""
    url = re.sub(r"//[^/@]*@", "//", url)
    return re.sub(r"(?i)([?&](?:[a-z_-]*(?:key|token|secret|signature|credential)[a-z_-]*)=)[^&]*", r"\1***", url)


def temp_name(name: str) -> str:
    """A hidden, per-writer unique temporary name for `name`; completed files are renamed from it."""
    return f".{name}.tmp-{uuid.uuid4().hex[:12]}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def publish_local(tmp_path: str, dst_url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Make a finished local file visible at `dst_url` atomically (rename locally, single PUT remotely)."""
    if is_local(dst_url):
        os.replace(tmp_path, local_path(dst_url))
        return
    fs, path = filesystem(dst_url, storage_options)
    fs.put_file(tmp_path, path)
    os.remove(tmp_path)


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
