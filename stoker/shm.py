"""Shared memory for what crosses from a DataLoader worker to the training process (below `dataloader` and
`augment`, which both build batches there).

A *slab* is a reusable shared-memory buffer; its first HEADER bytes hold its state word. A worker's `SlabPool`
marks a slab IN_USE before sending it; the training process marks it FREE once nothing but its own bookkeeping
references it (see `stoker.dataloader.workers`). Code that builds a batch in a worker (stoker's own transforms)
asks for its output buffer with `batch_buffer`: from the pool lent to it by the stage that calls it (`lending`), so
that output pages are reused instead of fresh ones being faulted in and zero-filled for every batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

HEADER = 64  # bytes before the data of a slab; the first int32 is its state
FREE, IN_USE, ONE_OFF = 0, 1, 2


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` allocated in shared memory directly, as default_collate does in workers: sending
    it to another process passes its file descriptor instead of copying it into shared memory first."""
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def slab_state(slab: torch.Tensor) -> np.ndarray:
    """The state word of a slab (FREE, IN_USE, ONE_OFF), shared by the worker and the training process."""
    return slab.numpy()[:4].view(np.int32)


Key = tuple[int, str, int]  # (worker pid, pool token, serial number of the slab)


class SlabPool:
    """A worker's reusable shared-memory buffers; each is sent to the main process once, then named by its key."""

    def __init__(self, max_slabs: int) -> None:
        self.max_slabs = max_slabs
        self.token = os.urandom(6).hex()  # pids get reused; keys must not
        self._slabs: list[tuple[Key, torch.Tensor]] = []
        self._serial = 0

    def take(self, nbytes: int) -> tuple[Key | None, torch.Tensor, bool, Key | None]:
        """(key, slab, first use, key of the slab it replaces) for a slab with `nbytes` of room, marked IN_USE.

        The key is None for a one-off slab (every pooled slab is still out), which is sent and never reused.
        """
        need = HEADER + nbytes
        free = [i for i, (_, slab) in enumerate(self._slabs) if slab_state(slab)[0] == FREE]
        for i in free:
            key, slab = self._slabs[i]
            if slab.numel() >= need:
                slab_state(slab)[0] = IN_USE
                return key, slab, False, None
        slab = shared_bytes(max(need + need // 4, 1 << 20))  # headroom, so slightly bigger batches fit next time
        if not free and len(self._slabs) >= self.max_slabs:
            slab_state(slab)[0] = ONE_OFF
            return None, slab, True, None
        self._serial += 1
        key, replaced = (os.getpid(), self.token, self._serial), None
        if free:  # a free slab that is too small makes room for a bigger one
            replaced = self._slabs[free[0]][0]
            self._slabs[free[0]] = (key, slab)
        else:
            self._slabs.append((key, slab))
        slab_state(slab)[0] = IN_USE
        return key, slab, True, replaced


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to a whole number of HEADER-sized blocks."""
    return -(-nbytes // HEADER) * HEADER


@dataclass
class Lent:
    """A slab handed out by `batch_buffer` while a batch was being built."""

    key: Key | None
    slab: torch.Tensor
    first: bool
    replaced: Key | None


_lending: contextvars.ContextVar[tuple[SlabPool, list[Lent]] | None] = contextvars.ContextVar("stoker_lending",
                                                                                              default=None)


@contextlib.contextmanager
def lending(pool: SlabPool) -> Iterator[list[Lent]]:
    """While the block runs (a worker building one batch), `batch_buffer` takes its buffers from `pool`; the list
    yielded receives the slabs handed out."""
    lent: list[Lent] = []
    token = _lending.set((pool, lent))
    try:
        yield lent
    finally:
        _lending.reset(token)


def batch_buffer(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of a pooled slab for the batch being built (uint8), or None when no pool is lent (not in one of
    stoker's own batch stages: allocate as usual)."""
    lending_now = _lending.get()
    if lending_now is None:
        return None
    pool, lent = lending_now
    key, slab, first, replaced = pool.take(nbytes)
    lent.append(Lent(key, slab, first, replaced))
    return slab[HEADER:HEADER + nbytes]
