"""List object stores fast: one paginated listing per top-level prefix, many prefixes at once.

An object store has no directories, only keys, and lists them 1,000 at a time. Listing a bucket of millions of
images with one `find` walks those pages one after another; listing each class prefix (`SRC/<class>/`) on its own
thread keeps dozens of requests in flight instead, so listing time is roughly `total pages / threads`.

Keys come back relative to SRC and sorted component by component, which is the order a local directory walk
gives, so a tree packs into the same shards from local disk and from a bucket.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any

from stoker import storage
from stoker.errors import SourceError

LIST_THREADS = 32


@dataclass(frozen=True)
class Listed:
    """One object found under SRC: its SRC-relative key and size in bytes."""

    key: str
    size: int


def _root(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, path = storage.filesystem(url, storage_options)
    return fs, path.rstrip("/")


def _hidden(key: str) -> bool:
    # Same rule as the local walk: any path component starting with "." is not part of the dataset.
    return any(part.startswith(".") for part in key.split("/"))


def _find(fs: Any, root: str, prefix: str) -> list[Listed]:
    found = fs.find(f"{root}/{prefix}" if prefix else root, detail=True)
    out = []
    for path, info in found.items():
        key = path[len(root) + 1:]
        # Zero-byte keys ending in "/" are "folder markers" some tools write; they are not files.
        if info.get("type") == "file" and key and not key.endswith("/") and not _hidden(key):
            out.append(Listed(key, int(info.get("size") or 0)))
    return out


def list_prefixes(url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], list[Listed]]:
    """The top level of `url`: (sorted sub-prefixes, files directly under it); hidden names are left out."""
    fs, root = _root(url, storage_options)
    fs.invalidate_cache(root)  # a listing must see the store as it is now, not as this process last saw it
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise SourceError(f"{storage.redact(url)}: no such prefix") from None
    prefixes, files = [], []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not name or name.startswith("."):
            continue
        if entry.get("type") == "directory":
            prefixes.append(name)
        else:
            files.append(Listed(name, int(entry.get("size") or 0)))
    return sorted(prefixes), sorted(files, key=lambda f: f.key)


def list_objects(
    url: str, prefixes: list[str], storage_options: dict[str, Any] | None = None, threads: int = LIST_THREADS
) -> dict[str, list[Listed]]:
    """Every file below each of `prefixes` (relative to `url`), listed in parallel; {prefix: sorted files}."""
    fs, root = _root(url, storage_options)
    with cf.ThreadPoolExecutor(max(1, min(threads, len(prefixes)))) as pool:
        listings = pool.map(lambda p: _find(fs, root, p), prefixes)
        return {p: sorted(found, key=lambda f: f.key.split("/")) for p, found in zip(prefixes, listings)}


def list_tree(url: str, storage_options: dict[str, Any] | None = None, threads: int = LIST_THREADS) -> list[Listed]:
    """Every file in the class folders of an image tree at `url` (path or URL), in the order packing uses.

    List once, save with `write_file_list`, and hand the file to every part with --files-from.
    """
    prefixes, _ = list_prefixes(url, storage_options)
    found = list_objects(url, prefixes, storage_options, threads)
    return [f for prefix in prefixes for f in found[prefix]]


def stat_objects(
    url: str, keys: list[str], storage_options: dict[str, Any] | None = None, threads: int = LIST_THREADS
) -> list[int | None]:
    """Sizes of the SRC-relative `keys` (None for a missing one), fetched in parallel: for --files-from lists."""
    fs, root = _root(url, storage_options)

    def size(key: str) -> int | None:
        try:
            return int(fs.size(f"{root}/{key}"))
        except FileNotFoundError:
            return None

    with cf.ThreadPoolExecutor(max(1, min(threads, len(keys)))) as pool:
        return list(pool.map(size, keys))


def read_file_list(path: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int | None]]:
    """Read a --files-from list (a local path or URL): one SRC-relative key per line, optionally `key<TAB>size`.

    With sizes, a remote SRC needs no request per file before packing starts.
    """
    so = storage_options if not storage.is_local(path) else None
    try:
        text = storage.read_bytes(path, so).decode("utf-8")
    except FileNotFoundError:
        raise SourceError(f"{storage.redact(path)}: files_from list not found") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        key, _, size = line.strip().partition("\t")
        if not key:
            continue
        if size and not size.strip().isdigit():
            raise SourceError(f"{storage.redact(path)}:{number}: expected `key` or `key<TAB>size in bytes`, got {line!r}")
        entries.append((key.removeprefix("./"), int(size) if size else None))
    return entries


def write_file_list(path: str, files: list[Listed]) -> None:
    """Write `files` as a --files-from list with sizes (local path), e.g. to list once and pack many times."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{item.key}\t{item.size}\n" for item in files)
