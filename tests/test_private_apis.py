"""Guards for the private torch and asyncio APIs stoker relies on: a torch or Python upgrade that changes one of
them fails here, by name, instead of somewhere deep in a loader run.

stoker/dataloader/loader.py: a DataLoader iterator's `_workers`, `_shutdown_workers`, `_worker_pids_set` and
    `torch.utils.data._utils.signal_handling._remove_worker_pids` (stopping workers at once for a re-deal or an error)
stoker/dataloader/workers.py: `torch._C._storage_Use_Count` (when a slab is free again) and
    `torch.utils.data._utils.pin_memory.pin_memory` calling an object's own `pin_memory()` (bundles)
stoker/shm.py: `torch.UntypedStorage._new_shared` (batches built in shared memory)
stoker/storage.py: asyncio's `loop._thread_id`, which `is_running()` reads (a forked worker's inherited loop)
"""

from __future__ import annotations

import asyncio
import threading

import torch
import torch.utils.data
from torch.utils.data._utils import signal_handling
from torch.utils.data._utils.pin_memory import pin_memory


def test_dataloader_iterator_internals_used_to_stop_workers():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2)
    it = iter(loader)
    try:
        next(it)
        workers = it._workers
        assert len(workers) == 2 and all(w.pid and w.is_alive() for w in workers)
        assert all(hasattr(w, name) for w in workers for name in ("exitcode", "kill"))
        assert it._worker_pids_set is True
        assert callable(signal_handling._remove_worker_pids)
        signal_handling._remove_worker_pids(id(it))  # what stoker does before killing them on purpose
        it._worker_pids_set = False
    finally:
        it._shutdown_workers()
    assert not any(w.is_alive() for w in workers)


def test_storage_use_count_counts_references():
    storage = torch.UntypedStorage._new_shared(64)
    assert storage.is_shared() and storage.nbytes() == 64
    base = torch._C._storage_Use_Count(storage._cdata)
    view = torch.empty(0, dtype=torch.uint8).set_(storage)
    assert torch._C._storage_Use_Count(storage._cdata) > base
    del view
    assert torch._C._storage_Use_Count(storage._cdata) == base


def test_pin_memory_calls_an_objects_own_pin_memory():
    class Pinned:
        def pin_memory(self):
            return "pinned by its own method"

    assert pin_memory(Pinned()) == "pinned by its own method"


def test_asyncio_is_running_reads_thread_id():
    loop = asyncio.new_event_loop()
    try:
        started = threading.Event()
        loop.call_soon(started.set)
        thread = threading.Thread(target=loop.run_forever)
        thread.start()
        started.wait(5)
        assert loop._thread_id == thread.ident and loop.is_running()
        saved, loop._thread_id = loop._thread_id, None
        assert not loop.is_running()  # what a forked worker's copy of the loop is made to say
        loop._thread_id = saved
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        assert not thread.is_alive()
    finally:
        loop.close()
