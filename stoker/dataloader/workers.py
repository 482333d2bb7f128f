"""What crosses the boundary between DataLoader workers and the training process, and how.

Batches: a worker copies the variable-width columns of a batch (image bytes, tokens) once, into a *slab*: a
shared-memory buffer that torch's own tensor sharing hands to the main process as a file descriptor (anonymous,
per-process, nothing named). Slabs are reused: fresh shared-memory pages cost a page fault and a zero-fill each,
which is slower than the copy itself. The first bytes of a slab are its state word. The worker sets it to IN_USE
before sending; the main process sets it back to FREE once nothing but its own bookkeeping references the slab
(torch's storage use count), i.e. once the user has dropped every view of that batch. A worker never waits for a
slab: when none is free it makes a new one, so holding on to batches is always safe.

Errors: an exception in a worker travels as `WorkerError` and is re-raised in the main process as the same type,
with the worker's traceback attached as a note.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from stoker.clock import sum_times
from stoker.dataloader.reader import MappedRows, mapped_values
from stoker.errors import ConfigError
from stoker.lru import LRU
from stoker.shm import FREE, HEADER, Key, Lent, slab_state


# Main process: slabs mapped so far, by (worker pid, pool token, slot), kept while their worker lives, and the keys
# of those whose batch the user may still hold. Unpickling runs in the pin-memory thread when pin_memory=True.
_slabs: dict[tuple[int, str, int], torch.Tensor] = {}
_held: set[tuple[int, str, int]] = set()
_retired: set[tuple[int, str, int]] = set()  # replaced by their worker, or their worker is gone
_lock = threading.Lock()
# Main process: values buffers of local Arrow shards that workers named rows in, by (file identity, column).
MAPPED_FILES = 64
_mapped: LRU[tuple[Any, str], list[np.ndarray]] = LRU(MAPPED_FILES)  # views the user holds keep their mapping


def topology() -> tuple[int, int]:
    """(rank, world size) of this training process: torch.distributed if initialized, else RANK/WORLD_SIZE, else (0, 1).

    Call it in the training process: DataLoader workers started with spawn or forkserver cannot see the process group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be integers"
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


# glibc gives each thread that allocates its own heap arena (up to 8 per core) and keeps what is freed there. A worker
# reading a remote dataset runs dozens of download threads; with an arena each, freed download buffers scatter over
# them and the heap creeps up epoch after epoch (benchmarks/soak.py). Two arenas, trimmed at each epoch's end, keep
# it flat; a fixed mmap threshold would too, but costs a page fault per page of every large buffer (3x the CPU per
# downloaded GB here).
_M_ARENA_MAX = -8


def _libc() -> Any | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


def limit_heap_arenas() -> None:
    """Cap this process's glibc heap arenas at two (before it starts threads), unless MALLOC_ARENA_MAX is set."""
    libc = _libc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, 2)


def trim_heap() -> bool:
    """Hand this process's free heap pages back to the system (glibc); whether any were."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class WireBatch:
    """A collated batch as it crosses processes: small columns pickled, variable-width ones in a slab.

    The slab tensor itself travels only with its first batch (torch passes its file descriptor); later batches
    name it by key, and the main process reuses the mapping it already has.
    """

    def __init__(self, key: Key | None, slab: torch.Tensor | None, replaced: Key | None, layout: tuple[Any, ...],
                 columns: dict[str, Any]) -> None:
        self.key, self.slab, self.replaced, self.layout, self.columns = key, slab, replaced, layout, columns

    def __reduce__(self) -> tuple[Any, ...]:
        return (unpack, (self.key, self.slab, self.replaced, self.layout, self.columns))


class Bundle:
    """Consecutive batches of one worker sent as one message: `items` are its batches number `first`, `first + 1`...

    One message per batch costs the training process about a millisecond of CPU (queue, pickling, torch's
    bookkeeping), as much as copying a few MB; bundling small batches divides that. The last item may be a
    `WorkerError`: the batches before it are delivered first. `times` are the worker's stage seconds since its
    previous message (`clock.StageClock.take`); crossing processes adds "handoff" and "receive" (`arrival_times`),
    pinning adds "pin". `skipped`: damaged samples the worker left out of its batches since its previous message
    (skip policy).
    """

    def __init__(self, worker: int, first: int, items: list[Any], times: dict[str, float] | None = None,
                 skipped: int = 0) -> None:
        self.worker, self.first, self.items = worker, first, items
        self.times = {} if times is None else times
        self.skipped = skipped

    def __reduce__(self) -> tuple[Any, ...]:
        return (_bundle_arrived, (UnpickleStart(), self.worker, self.first, self.items, self.times, self.skipped,
                                  PickleSeconds(time.perf_counter())))

    def pin_memory(self) -> Bundle:
        """What torch's pin-memory thread calls: pin each batch as it would pin a lone one."""
        items, times = pin_timed(self.items, self.times)
        return Bundle(self.worker, self.first, items, times, self.skipped)


def pin_timed(items: list[Any], times: dict[str, float]) -> tuple[list[Any], dict[str, float]]:
    """`items` pinned as torch's pin-memory thread pins a lone batch, and `times` with the seconds it took as "pin"."""
    from torch.utils.data._utils.pin_memory import pin_memory

    start = time.perf_counter()
    pinned = [pin_memory(item) for item in items]
    return pinned, sum_times(times, {"pin": time.perf_counter() - start})


class UnpickleStart:
    """Pickled first among a message's arguments: unpickling it reads the clock, so the function that rebuilds the
    message (unpickled last) knows how long unpickling its batches took."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (time.perf_counter, ())


class PickleSeconds:
    """Pickled last among a message's arguments: it turns into the seconds the worker spent pickling the batches
    before it (moving tensors into shared memory included)."""

    def __init__(self, start: float) -> None:
        self.start = start

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (time.perf_counter() - self.start,))


def arrival_times(times: dict[str, float], pickled: float, start: float) -> dict[str, float]:
    """A message's stage seconds as it arrives: the worker's `times`, its pickling as "handoff" (in the worker, so
    workers pickle side by side) and the unpickling that just ended, since `start`, as "receive" (in the training
    process, one message after another)."""
    return sum_times(times, {"handoff": pickled, "receive": time.perf_counter() - start})


def _bundle_arrived(start: float, worker: int, first: int, items: list[Any], times: dict[str, float], skipped: int,
                    pickled: float) -> Bundle:
    return Bundle(worker, first, items, arrival_times(times, pickled, start), skipped)


class WireBundle:
    """Columnar batches of one worker that share one slab; unpickles into a `Bundle` (each batch via `unpack`)."""

    def __init__(self, worker: int, first: int, key: Key | None, slab: torch.Tensor | None, replaced: Key | None,
                 parts: list[tuple[tuple[Any, ...], dict[str, Any]]], times: dict[str, float] | None = None) -> None:
        self.worker, self.first, self.key, self.slab, self.replaced, self.parts = worker, first, key, slab, replaced, parts
        self.times = {} if times is None else times
        self.skipped = 0  # as `Bundle.skipped`

    def __reduce__(self) -> tuple[Any, ...]:
        return (unpack_bundle, (UnpickleStart(), self.worker, self.first, self.key, self.slab, self.replaced,
                                self.parts, self.times, self.skipped, PickleSeconds(time.perf_counter())))


def unpack_bundle(start: float, worker: int, first: int, key: Key | None, slab: torch.Tensor | None,
                  replaced: Key | None, parts: list[tuple[tuple[Any, ...], dict[str, Any]]], times: dict[str, float],
                  skipped: int, pickled: float) -> Bundle:
    """Main-process side of `WireBundle`: each batch is built by `unpack`, the slab's descriptor crosses once."""
    items = []
    for i, (layout, columns) in enumerate(parts):
        # A pooled slab is registered by the first batch; a one-off slab is not, so every batch carries it.
        items.append(unpack(key, slab if i == 0 or key is None else None, replaced if i == 0 else None, layout,
                            columns))
    return Bundle(worker, first, items, arrival_times(times, pickled, start), skipped)


def build(buffer: torch.Tensor | None, layout: tuple[Any, ...], columns: dict[str, Any]) -> dict[str, Any]:
    """The user's batch: ints as int64 tensors, strings as lists, bytes as memoryviews, tokens as tensors.

    `layout` entries are (name, kind, numpy dtype, byte offset in `buffer`, row offsets); the views keep `buffer`'s
    storage alive, which is what tells the main process when a slab is free again.
    """
    batch: dict[str, Any] = {}
    data = None
    ragged = {entry[0]: entry for entry in layout}
    for name, value in columns.items():
        if isinstance(value, MappedRows):
            batch[name] = _view_mapped(value, name)
            continue
        if name not in ragged:
            batch[name] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            continue
        _, kind, dtype, at, offsets = ragged[name]
        if kind == "binary":
            if data is None:
                data = memoryview(buffer.numpy())  # slicing a memoryview costs a tenth of slicing an array
            bounds = (offsets + at).tolist()
            batch[name] = ByteViews(data[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        else:
            itemsize = np.dtype(dtype).itemsize
            flat = buffer[at:at + int(offsets[-1]) * itemsize].view(_TORCH_DTYPES[np.dtype(dtype)])
            batch[name] = list(torch.split(flat, np.diff(offsets).tolist())) if len(offsets) > 1 else []
    return batch


class ByteViews(list):
    """The rows of a bytes column in a batch: a list of memoryviews. With pin_memory=True torch would turn each
    memoryview into a list of ints (it is a Sequence); bytes are not pinned, so pinning leaves them as they are."""

    def pin_memory(self, device: Any = None) -> ByteViews:
        return self


def _view_mapped(rows: MappedRows, column: str) -> ByteViews:
    """Read-only views of rows that lie in local Arrow files, mapped in this process (kept for later batches)."""
    views = []
    for identity, batch in rows.refs:
        key = (identity, column)
        with _lock:
            sources = _mapped.get(key)
        if sources is None:
            sources = mapped_values(identity, column)
            with _lock:
                _mapped.put(key, sources)
        views.append(memoryview(sources[batch]))
    ends = (rows.start + rows.length).tolist()
    return ByteViews(views[r][a:b] for r, a, b in zip(rows.ref.tolist(), rows.start.tolist(), ends))


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16, np.dtype(np.uint32): torch.uint32,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def unpack(key: Key | None, slab: torch.Tensor | None, replaced: Key | None, layout: tuple[Any, ...],
           columns: dict[str, Any]) -> dict[str, Any]:
    """Main-process side of `WireBatch`: build the batch on the slab, then hand back slabs no longer referenced."""
    with _lock:
        if replaced is not None:
            _retired.add(replaced)  # unmapped once the user lets go of it
        if key is not None:
            if slab is not None:
                _slabs[key] = slab
                _forget_dead_workers()
            slab = _slabs[key]
    if slab is None:  # a batch without variable-width columns
        return build(None, layout, columns)
    user = torch.empty(0, dtype=torch.uint8).set_(slab.untyped_storage())  # the user's views hang off this one
    batch = build(user[HEADER:], layout, columns)
    del user
    with _lock:
        if key is not None:
            _held.add(key)
        release_free_slabs()
    return batch


class SlabTensor:
    """A tensor of a batch that a worker built in a pooled slab (`shm.batch_buffer`), as it crosses processes: the
    slab travels with its first batch, later ones name it by key, as `WireBatch` does."""

    def __init__(self, key: Key | None, slab: torch.Tensor | None, replaced: Key | None, tensor: torch.Tensor) -> None:
        self.key, self.slab, self.replaced = key, slab, replaced
        self.offset, self.size, self.stride, self.dtype = (tensor.storage_offset(), tuple(tensor.shape),
                                                           tuple(tensor.stride()), tensor.dtype)

    def __reduce__(self) -> tuple[Any, ...]:
        return (unpack_tensor, (self.key, self.slab, self.replaced, self.offset, self.size, self.stride, self.dtype))


def unpack_tensor(key: Key | None, slab: torch.Tensor | None, replaced: Key | None, offset: int,
                  size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Main-process side of `SlabTensor`: the user's tensor on the slab, which is handed back once it is dropped."""
    with _lock:
        if replaced is not None:
            _retired.add(replaced)
        if key is not None:
            if slab is not None:
                _slabs[key] = slab
                _forget_dead_workers()
            slab = _slabs[key]
    assert slab is not None
    tensor = torch.empty(0, dtype=dtype).set_(slab.untyped_storage(), offset, size, stride)
    with _lock:
        if key is not None:
            _held.add(key)
        release_free_slabs()
    return tensor


def wire_slabs(batch: Any, lent: list[Lent]) -> Any:
    """`batch` with each tensor that lies in a slab of `lent` replaced by its `SlabTensor`; slabs the batch does not
    use (a transform that copied its output) are free again at once."""
    storages = {item.slab.untyped_storage().data_ptr(): item for item in lent}
    used: set[int] = set()

    def swap(value: Any, depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            item = storages.get(value.untyped_storage().data_ptr())
            if item is None:
                return value
            first = id(item) not in used
            used.add(id(item))
            return SlabTensor(item.key, item.slab if (item.first and first) or item.key is None else None,
                              item.replaced if first else None, value)
        if depth < 3 and isinstance(value, dict):
            return {k: swap(v, depth + 1) for k, v in value.items()}
        if depth < 3 and isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(swap(v, depth + 1) for v in value)
        return value

    out = swap(batch, 0)
    for item in lent:
        if id(item) not in used and item.key is not None:
            slab_state(item.slab)[0] = FREE  # never sent: the worker may reuse it at once
    return out


def release_free_slabs() -> None:
    """Mark FREE every held slab that nothing outside this module references any more (call with the lock held)."""
    for key in list(_held) + [k for k in _retired if k not in _held]:
        slab = _slabs.get(key)
        # One reference is the mapping in `_slabs`, one the temporary storage object of this call; more are the user's.
        if slab is not None and torch._C._storage_Use_Count(slab.untyped_storage()._cdata) > 2:
            continue
        _held.discard(key)
        if key in _retired:
            _retired.discard(key)
            _slabs.pop(key, None)
        elif slab is not None:
            slab_state(slab)[0] = FREE


def _forget_dead_workers() -> None:
    for pid in {k[0] for k in _slabs}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # the worker is gone: drop our mappings, the kernel frees its shared memory
            for key in [k for k in _slabs if k[0] == pid]:
                _retired.add(key)
        except PermissionError:
            pass
    release_free_slabs()


def sweep() -> None:
    """Hand back slabs of batches the user has dropped, and unmap slabs of workers that are gone."""
    with _lock:
        release_free_slabs()
        _forget_dead_workers()


def check_picklable(batch: Any) -> None:
    """Raise a TypeError if `batch` cannot be sent to the main process."""
    try:
        ForkingPickler.dumps(batch)
    except Exception as exc:
        raise TypeError(
            f"a batch from collate_fn/transform cannot be sent to the main process ({exc!r}); return tensors, "
            "numpy arrays, numbers, strings and containers of them"
        ) from exc


class WorkerError:
    """An exception raised in a worker, carried to the main process with its traceback."""

    def __init__(self, exc: BaseException, where: str) -> None:
        self.where = where
        self.text = "".join(traceback.format_exception(exc))
        self.exc = exc
        try:  # an exception that cannot travel would be dropped by the queue's feeder thread: send its text instead
            ForkingPickler.dumps((type(exc), exc.args, vars(exc)))
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self.exc), self.exc.args, vars(self.exc), self.text, self.where))

    def reraise(self) -> None:
        raise self.exc


def _rebuild_error(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any], text: str,
                   where: str) -> WorkerError:
    # Built without calling __init__: stoker's errors take several arguments and already carry their message.
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    exc.add_note(f"Raised in {where}; original traceback:\n{text.rstrip()}")
    error = WorkerError.__new__(WorkerError)
    error.exc, error.text, error.where = exc, text, where
    return error
