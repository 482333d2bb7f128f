"""The local shard cache: a bounded directory of complete, verified shard files, and the downloads that fill it.

Safe with many threads, processes and jobs on one machine:
- a file appears under its final name only by atomic rename, so a file with its final name is complete;
- filling takes a per-file lock (fcntl, so a dead holder releases it), so one process downloads while the others
  wait for it, each with a timeout;
- least recently used files (by access time, touched on every use; the mtime stays the fill's) are evicted to stay
  under the byte limit, skipping files being filled and files a reader holds (`hold`: a shared flock on the entry);
  a fill counts at its final size from its start (its temporary file is reserved at that size while the eviction
  lock is held), so fills running at once in several processes stay within the limit together. The directory's
  files stay within the limit unless the entries in use (held by readers, being filled) alone are larger than it;
  besides, an entry removed while a reader holds or a pin keeps it still takes its disk space until let go;
- a reader hands rows of a held entry to another process (the training process maps the same file) through a pin,
  a hard link under `.pins/` made from the reader's open file, so the very file it read stays on disk until the
  other process has opened it, whatever eviction does meanwhile (`Held.handoff`, `claim`); pins of a training
  process or of a worker that is gone (a batch that will never be received) are removed during eviction;
- temporary files carry a per-writer unique name; orphans of crashed writers are removed during eviction.

Downloads are parallel ranged reads (through the client `dataloader.remote` chooses), each retried with exponential backoff, all bounded by one
deadline. Every part must have the length asked for, so an entry is complete. Its contents are checked against the
manifest's sha256 (hashed in order; a mismatch is fetched once more, then an error) unless the caller checks them
another way: shards whose every sample carries a checksum that is checked on every read skip it (see
`dataloader.remote`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from filelock import FileLock, Timeout

from stoker import storage
from stoker.errors import ShardError, ShardNotFoundError, StokerError, StorageError
from stoker.names import unsafe_name

_LOCKS = ".locks"
_PINS = ".pins"


_Task = tuple[cf.Future[Any], Callable[..., Any], tuple[Any, ...]]


class IOPool:
    """Daemon threads for blocking I/O (network and disk release the GIL).

    Unlike ThreadPoolExecutor, queued downloads never hold up the exit of a worker process.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        _name_native_thread(threading.current_thread().name)
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


def _name_native_thread(name: str) -> None:
    # The OS-level name (Linux, 15 characters), so that top -H, perf and /proc/<pid>/task tell these threads apart.
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def wait(future: cf.Future[Any], deadline: float, what: str) -> Any:
    """The future's result, or a StorageError once `deadline` (time.monotonic) has passed."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except cf.TimeoutError:
        future.cancel()
        raise StorageError(f"{what}: no answer before the deadline; is the storage endpoint reachable?") from None


# Fills of one entry started again after the cache directory was deleted under them: a cleanup (`rm -rf`) that
# is still deleting when the fill starts again can take each new attempt too, so one deletion can cost several.
VANISH_RETRIES = 8


class ShardCache:
    """A directory of shard files under a byte limit, shared safely by processes and jobs on one machine."""

    def __init__(self, directory: str, limit: int) -> None:
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.limit = int(limit)
        os.makedirs(os.path.join(self.directory, _LOCKS), exist_ok=True)

    def path(self, key: str) -> str:
        """Where the file for `key` (a plain file name) lives once filled."""
        why = unsafe_name(key)
        if why is not None:
            # Keys come from manifests, which may come from anywhere: never a path outside the cache directory.
            raise StorageError(f"cache key {key[:80]!r} is not a plain file name ({why})")
        return os.path.join(self.directory, key)

    def complete(self, key: str, size: int) -> bool:
        """Whether the entry for `key` is filled, at `size` bytes (it may still be evicted before it is opened);
        unlike `get`, this does not count as a use."""
        return _complete(self.path(key), size) is not None

    def _lock(self, key: str, timeout: float) -> FileLock:
        return FileLock(os.path.join(self.directory, _LOCKS, key + ".lock"), timeout=timeout)

    def get(self, key: str, size: int, fill: Callable[[str], None], timeout: float) -> str:
        """Path of the complete file for `key`; calls `fill(tmp_path)` to create it if it is missing."""
        path = self.path(key)
        if _touch(path, size):
            return path
        # The directory may have been deleted under a running job (a cleanup script): make it again.
        os.makedirs(os.path.join(self.directory, _LOCKS), exist_ok=True)
        lock = self._lock(key, timeout)
        try:
            # Another worker is usually filling this very shard (workers of one epoch read the same shards): notice
            # its end within milliseconds, not filelock's default 50 ms.
            lock.acquire(poll_interval=0.005)
        except Timeout:
            raise StorageError(
                f"waited {timeout:.0f}s for another process to fill {key} into the cache {self.directory}"
            ) from None
        try:
            if _touch(path, size):  # another process filled it while we waited
                return path
            _remove(path)  # a damaged entry (wrong size): filled again below
            full, vanished = False, 0
            while True:
                tmp = os.path.join(self.directory, storage.temp_name(key))
                try:
                    # After ENOSPC: evict every entry not in use (the disk filled before the byte limit was reached).
                    self._make_room(size, keep=key, timeout=timeout, limit=0 if full else self.limit, reserve=tmp)
                    fill(tmp)
                    os.replace(tmp, path)
                    return path
                except OSError as exc:
                    if isinstance(exc, StokerError):
                        raise
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not full:
                        full = True
                    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise StorageError(
                            f"no space left for {key} ({size} bytes) in the cache {self.directory}, even after "
                            "evicting every entry not in use: free disk space or lower cache_limit"
                        ) from None
                    elif isinstance(exc, FileNotFoundError) and vanished < VANISH_RETRIES:
                        # The directory was deleted while we filled (a cleanup script; its `rm -rf` may still be
                        # running and take the directory we make again with it): make it again, fill again.
                        vanished += 1
                        os.makedirs(os.path.join(self.directory, _LOCKS), exist_ok=True)
                    elif isinstance(exc, FileNotFoundError):
                        raise StorageError(
                            f"the cache directory {self.directory} was deleted {vanished + 1} times while {key} was "
                            "being filled into it; stop whatever keeps deleting it"
                        ) from exc
                    else:
                        raise
                finally:
                    _remove(tmp)
        finally:
            lock.release()

    def evict(self, key: str, timeout: float) -> None:
        """Remove the entry for `key` (found damaged by its reader) so that the next `get` fills it again."""
        with self._lock(key, timeout):
            _remove(self.path(key))

    def _make_room(self, incoming: int, keep: str, timeout: float, limit: int | None = None,
                   reserve: str | None = None) -> None:
        # `limit=0`: evict every entry not in use (the disk filled up before the byte limit was reached).
        # `reserve`: the fill's temporary file, made here at its final size before the lock is let go, so that the
        # next process's scan counts this fill in full while it is still downloading (fills that each made room
        # only for their own shard would together pass the limit).
        limit = self.limit if limit is None else limit
        os.makedirs(os.path.join(self.directory, _LOCKS), exist_ok=True)
        with FileLock(os.path.join(self.directory, _LOCKS, "evict.lock"), timeout=timeout):
            _remove_stale_pins(os.path.join(self.directory, _PINS))
            entries, total = [], 0
            for entry in os.scandir(self.directory):
                if not entry.is_file(follow_symlinks=False):
                    continue
                if storage.is_temp_name(entry.name):
                    if not self._remove_orphan(entry.name, keep):
                        total += _size(entry)  # a fill in progress, reserved at its final size
                    continue
                stat = entry.stat(follow_symlinks=False)
                entries.append((stat.st_atime_ns, stat.st_size, entry.name))
                total += stat.st_size
            for _, size, name in sorted(entries):
                if total + incoming <= limit:
                    break
                if name != keep and self._try_remove(name, name):
                    total -= size
            if reserve is not None:
                _reserve(reserve, incoming)

    def _remove_orphan(self, tmp_name: str, keep: str) -> bool:
        # ".<key>.tmp-<id>": a writer holds <key>'s lock while the file is being written. This process holds
        # `keep`'s lock itself, so a temporary file of `keep` is a crashed writer's.
        key = tmp_name[1:tmp_name.rindex(".tmp-")]
        if key == keep:
            _remove(os.path.join(self.directory, tmp_name))
            return True
        return self._try_remove(key, tmp_name)

    def _try_remove(self, key: str, name: str) -> bool:
        lock = self._lock(key, 0)
        try:
            lock.acquire()
        except Timeout:
            return False  # being filled or read right now
        try:
            fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            lock.release()
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a reader holds it (`hold`)
            os.remove(os.path.join(self.directory, name))
            return True
        except (BlockingIOError, FileNotFoundError):
            return False
        finally:
            os.close(fd)
            lock.release()


class Held(tuple):
    """(path, device, inode, size, mtime) of a cache entry this process reads, with `fd`: the entry opened and
    share-locked, which eviction respects. `path` opens the very file held, even if its name was removed since."""

    fd: int

    def __new__(cls, path: str, stat: os.stat_result, fd: int) -> Held:
        held = super().__new__(cls, (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        held.fd = fd
        return held

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, (tuple(self),)  # the descriptor means nothing in another process

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def handoff(self) -> Handoff:
        """This identity with a pin: a new hard link to the held file, for the process that `claim`s it."""
        pins = os.path.join(os.path.dirname(self[0]), _PINS)
        name = f"{os.getppid()}-{os.getpid()}-{next(_pin_numbers)}-{os.path.basename(self[0])}"
        try:
            os.makedirs(pins, exist_ok=True)
            directory = os.open(pins, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: the open file itself, not what the entry's name
                # points at now (a directory descriptor makes os.link use linkat with that flag).
                os.link(self.path, name, dst_dir_fd=directory, follow_symlinks=True)
            finally:
                os.close(directory)
        except OSError:
            return Handoff(tuple(self))  # its name was removed (found damaged): the receiver checks by path
        return Handoff(tuple(self), os.path.join(pins, name))

    def close(self) -> None:
        os.close(self.fd)


_pin_numbers = itertools.count()


class Handoff(tuple):
    """A held entry's identity (equal to it) on its way to another process, with the pin that keeps its file on disk
    until then; unpickled, it opens the pin (`fd`, or None if there was none) and removes it."""

    pin: str | None
    fd: int | None

    def __new__(cls, identity: tuple[Any, ...], pin: str | None = None, fd: int | None = None) -> Handoff:
        handoff = super().__new__(cls, identity)
        handoff.pin, handoff.fd = pin, fd
        return handoff

    def __reduce__(self) -> tuple[Any, ...]:
        return claim, (tuple(self), self.pin)

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def claim(identity: tuple[Any, ...], pin: str | None) -> Handoff:
    """The receiving side of `Held.handoff`: the pinned file opened (its pin removed), or no file if there is none."""
    if pin is None:
        return Handoff(identity)
    try:
        fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return Handoff(identity)
    _remove(pin)
    return Handoff(identity, fd=fd)


def hold(path: str, what: str) -> Held:
    """Open the cache entry at `path` and hold it (a shared flock) until `Held.close`: it is not evicted meanwhile."""
    evicted = f"{what} was evicted from the cache {os.path.dirname(path)} before it was opened"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShardNotFoundError(evicted) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        stat = os.fstat(fd)
        if stat.st_nlink == 0:  # evicted between open and lock
            raise ShardNotFoundError(evicted)
    except BaseException:
        os.close(fd)
        raise
    return Held(path, stat, fd)


def _remove_stale_pins(pins: str) -> None:
    # "<training process pid>-<worker pid>-<n>-<key>": left over when the training process never received the batch.
    # It never will once either process is gone: a worker exits only when its DataLoader iterator shuts it down, and
    # the iterator drops whatever that worker sent and it had not received (an epoch left early, a re-deal).
    try:
        names = os.listdir(pins)
    except FileNotFoundError:
        return
    for name in names:
        try:
            for pid in name.split("-", 2)[:2]:
                os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(os.path.join(pins, name))
        except (ValueError, PermissionError):
            continue  # not ours, or a process of another user: alive


def _size(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0  # renamed into place or removed since the listing: counted under its final name, or gone


def _reserve(path: str, size: int) -> None:
    """Create `path` at `size` bytes, its blocks allocated where the filesystem can (a full disk shows now, before
    the download, as ENOSPC); elsewhere a sparse file of that size, which the eviction scan counts all the same."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        if size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _complete(path: str, size: int | None = None) -> os.stat_result | None:
    """The stat of the complete entry at `path` (of `size` bytes, if given), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    # A wrong size: truncated or replaced behind our back, refilled under the lock.
    return st if size is None or st.st_size == size else None


def _touch(path: str, size: int | None = None) -> bool:
    """Whether a complete entry is at `path` (of `size` bytes, if given); marks it as just used."""
    st = _complete(path, size)
    if st is None:
        return False
    try:
        # The access time is the LRU clock; the mtime stays the fill's, part of the entry's identity (`Held`).
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except FileNotFoundError:
        return False
    except PermissionError:
        pass  # another user's entry in a shared cache: setting times needs its owner; it is complete all the same
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def retry(fn: Callable[[], Any], *, attempts: int, backoff: float, deadline: float, what: str) -> Any:
    """`fn()`, retried with exponential backoff on storage errors until `attempts` or `deadline` run out.

    Missing objects and stoker's own errors are not retried; denied access becomes a StorageError at once.
    """
    last: BaseException | None = None
    attempt = 0
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (StokerError, FileNotFoundError):
            raise
        except PermissionError as exc:
            raise StorageError(f"{what}: access denied ({exc}); check the credentials in storage_options") from None
        except Exception as exc:  # network and server errors of any client library
            last = exc
        pause = backoff * 2 ** (attempt - 1)
        if attempt == attempts or time.monotonic() + pause > deadline:
            break
        time.sleep(pause)
    # The client's error can quote the URL with its credentials: only a redacted copy is kept, not the exception.
    raise StorageError(
        f"{what} failed after {attempt} attempt(s): {storage.redact_text(repr(last))}; check the endpoint, "
        "credentials and network"
    ) from None


def read_part(read: Callable[[int, int], Any], span: tuple[int, int], attempts: int, backoff: float,
              deadline: float, what: str) -> Any:
    """`read(start, end)` for span (start, end), retried with exponential backoff; errors name `what`."""
    start, end = span
    try:
        return retry(lambda: read(start, end), attempts=attempts, backoff=backoff, deadline=deadline,
                     what=f"{what}: reading bytes {start}-{end}")
    except FileNotFoundError as exc:
        if isinstance(exc, ShardNotFoundError):
            raise
        raise ShardNotFoundError(
            f"{what} does not exist in storage; check the URL and that the upload finished"
        ) from None


def download(read: Callable[[int, int], Any], dst: str, size: int, *, pool: IOPool, part_size: int, parallel: int,
             attempts: int, backoff: float, deadline: float, what: str, sha256: bool = True) -> str:
    """Write an object of `size` bytes to local `dst` with up to `parallel` ranged reads `read(start, end)` in
    flight; return its sha256 (or "" with `sha256=False`: the caller checks the contents another way)."""
    spans = collections.deque((s, min(s + part_size, size)) for s in range(0, size, part_size))
    pending: collections.deque[tuple[int, cf.Future[bytes]]] = collections.deque()
    digest = hashlib.sha256() if sha256 else None
    # Not truncated to 0: the cache reserves `dst` at its final size before the fill (see `ShardCache`).
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        while spans or pending:
            while spans and len(pending) < parallel:
                span = spans.popleft()
                pending.append((span[0], pool.submit(read_part, read, span, attempts, backoff, deadline, what)))
            start, future = pending.popleft()
            data = wait(future, deadline, what)
            if digest is not None:
                digest.update(data)  # in order, while later parts are still in flight
            os.pwrite(fd, data, start)
            # The disk starts on each part now, alongside the download, instead of on all of them at the fsync
            # below, which then waits less and costs less (measured: docs/dataloader.md, *Measured here*).
            storage.start_writeback(fd, start, len(data))
        os.fsync(fd)  # the rename that publishes the file must not outlive its data in a crash
    finally:
        os.close(fd)
        for _, future in pending:
            future.cancel()
    return digest.hexdigest() if digest is not None else ""


def fill_verified(dst: str, fetch: Callable[[str], str], expected_sha256: str, name: str, where: str) -> None:
    """Run `fetch(dst)` (which returns the sha256 of what it wrote) and insist on `expected_sha256`.

    A mismatch can be a damaged transfer, so the shard is fetched once more before it is reported.
    """
    digest = ""
    for _ in range(2):
        digest = fetch(dst)
        if digest == expected_sha256:
            return
    raise ShardError(
        name,
        f"sha256 of {where} is {digest[:16]}..., the manifest says {expected_sha256[:16]}..., also after a "
        "refetch: the stored object differs from the manifest (re-upload the shard or repack the dataset)",
    )
