"""The stoker error hierarchy: one root, each class also a builtin so callers can catch either."""

from __future__ import annotations


class StokerError(Exception):
    """Root of every error stoker raises on purpose."""


class ConfigError(StokerError, ValueError):
    """An invalid option or combination of options, caught when a pipeline is built."""


class MissingExtraError(StokerError, ImportError):
    """An optional backend is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the optional package {package!r}: "
            f"install it with `pip install 'stoker[{extra}]'`"
        )
        self.extra = extra
        self.package = package


class SourceError(StokerError, ValueError):
    """A raw input file (image, text row) cannot be packed; names the file and line."""


class ShardError(StokerError, ValueError):
    """A shard is corrupt, truncated or not what the manifest says; names the shard and offset."""

    def __init__(self, shard: str, message: str, offset: int | None = None, *, row: int | None = None) -> None:
        where = shard
        if offset is not None:
            where += f" at byte offset {offset}"
        if row is not None:
            where += f" (row {row})"
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.offset = offset
        self.row = row


class ShardNotFoundError(StokerError, FileNotFoundError):
    """A shard listed in the manifest does not exist in storage."""


class ManifestError(StokerError, ValueError):
    """The manifest is missing, unreadable, of an unknown version, or inconsistent."""


class StorageError(StokerError, OSError):
    """Remote storage failed after all retries; names the URL and the last cause."""


class StateError(StokerError, ValueError):
    """A checkpoint does not match the current configuration; names the keys that differ."""
