"""Reading source files and naming them: the bytes of a file (local or URL) and the keys samples carry."""

from __future__ import annotations

import os
from typing import Any

from stoker import storage
from stoker.errors import SourceError
from stoker.names import unsafe_name


def check_key(key: str) -> str:
    """Reject keys that could name something outside the dataset (see `stoker.names.unsafe_name`)."""
    why = unsafe_name(key, nested=True)
    if why is not None:
        raise SourceError(f"{key!r}: unsafe sample key ({why}); rename the file")
    return key


def shown(key: str) -> str:
    """A file name as text that can always be printed and stored: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(key).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """Whether a file name is text (Python keeps undecodable bytes of a name as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_file(path: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of a source file (local path or URL); one that vanished since it was listed is a SourceError."""
    try:
        if storage.is_local(path):
            with open(storage.local_path(path), "rb") as f:
                return f.read()
        return storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        # Listing and reading are minutes apart at scale; say so rather than a bare errno.
        raise SourceError(f"{storage.redact(path)}: file disappeared after SRC was listed (deleted or moved)") from None
    except OSError as exc:
        raise SourceError(f"{storage.redact(path)}: unreadable ({type(exc).__name__}: {exc})") from None
