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

    def __init__(self, shard: str, message: str | None = None, offset: int | None = None, *, row: int | None = None) -> None:
        if message is None:
            # One argument: an already formatted message, as torch's DataLoader rebuilds a worker's exception.
            super().__init__(shard)
            self.shard, self.offset, self.row, self._message = "", offset, row, shard
            return
        where = shard
        if offset is not None:
            where += f" at byte offset {offset}"
        if row is not None:
            where += f" (row {row})"
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.offset = offset
        self.row = row
        self._message = message

    def __reduce__(self):  # keep the type across processes (DataLoader workers pickle exceptions)
        return _rebuild_shard_error, (type(self), self.shard, self._message, self.offset, self.row)


class ShardNotFoundError(StokerError, FileNotFoundError):
    """A shard listed in the manifest does not exist in storage."""


class ManifestError(StokerError, ValueError):
    """The manifest is missing, unreadable, of an unknown version, or inconsistent."""


class StorageError(StokerError, OSError):
    """Remote storage failed after all retries; names the URL and the last cause."""


class StateError(StokerError, ValueError):
    """A checkpoint does not match the current configuration; names the keys that differ."""


def _rebuild_shard_error(cls: type, shard: str, message: str, offset: int | None, row: int | None) -> ShardError:
    return cls(shard, message, offset, row=row)


class ChecksumError(ShardError):
    """A sample's bytes differ from what was packed (its stored checksum does not match); names shard, row and key."""


class SkippedSampleWarning(UserWarning):
    """A damaged sample was dropped by `ReadOptions(on_error="skip")`; names shard, row and key."""


class UncheckedDataWarning(UserWarning):
    """A dataset was packed without per-sample checksums, so its samples are read unchecked."""
