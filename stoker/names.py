"""One rule for names read from outside (sample keys, shard names, cache keys): safe to join under a folder.

Names come from directory listings, bucket listings and manifests, any of which may be hostile. A safe name, joined
under its folder or URL prefix, names something inside it and nothing else: on any OS, and through fsspec, which
reads "::" as a chain of protocols and "proto:" as a protocol.
"""

from __future__ import annotations

import re


def unsafe_name(name: str, *, nested: bool = False) -> str | None:
    """Why `name` could point outside its folder, or None when it cannot; `nested` lets "/" separate parts."""
    if not name:
        return "empty"
    for char, why in (("\0", "a NUL byte"), ("\\", "a backslash")):
        if char in name:
            return f"contains {why}"
    if ":" in re.sub(r":[0-9]+$", "", name):
        return "contains a colon (allowed only as the ':N' line or row number that ends a text sample's key)"
    if not nested and "/" in name:
        return "contains '/'"
    if name.startswith("/"):
        return "absolute"
    parts = name.split("/")
    if "" in parts:
        return "an empty part ('//' or a trailing '/')"
    if any(part.startswith(".") for part in parts):
        return "a part starting with '.' ('.', '..' or hidden)"
    return None
