"""stoker.DataLoader: torch's DataLoader, argument for argument, with a fast and resumable path for StreamingDataset.

Any other dataset goes through torch's own machinery untouched (it already fetches with `__getitems__` when a
dataset has it), so samplers, batch samplers, collate functions, worker seeding, timeouts and errors behave exactly
as in torch. For a StreamingDataset with a batch size, workers build whole batches instead of single samples:
each worker gathers its batch's rows straight from the mapped record batches, collates column by column, and sends
the variable-width data through a reusable shared-memory slab (see `workers.py`). The main process counts delivered
batches, which is all a checkpoint needs (see `order.py`).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch.utils.data

from stoker.dataloader import order, workers
from stoker.dataloader.stream import Progress, StreamingDataset, progress_state
from stoker.errors import ConfigError


def _passthrough(batch: Any) -> Any:
    # Workers already collate; torch's default_convert would walk every batch for nothing.
    return batch


class DataLoader(torch.utils.data.DataLoader):
    """Drop-in torch.utils.data.DataLoader; batches of a StreamingDataset are built in workers and resumable."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Any = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Any = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
    ) -> None:
        # The signature mirrors torch's on purpose; torch validates every combination exactly as it always does.
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last,
            timeout, worker_init_fn, multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device, in_order=in_order,
        )
        self._streaming = isinstance(dataset, StreamingDataset) and batch_size is not None
        self._user_collate = collate_fn
        self._inner: torch.utils.data.DataLoader | None = None
        self._inner_topology: tuple[int, int] | None = None
        self._progress: Progress | None = None

    def __iter__(self) -> Any:
        if not self._streaming:
            return super().__iter__()
        return _StreamIterator(self)

    def __len__(self) -> int:
        if not self._streaming:
            return super().__len__()
        rank, world = workers.topology()
        remaining = self.dataset.manifest.num_samples - int(self.dataset._control[1])
        return order.rank_units(remaining, self.batch_size, rank, world, self.drop_last or self.dataset.drop_last)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of this rank's progress: {version, config, epoch, consumed}; valid for any rank to load."""
        ds = self._stream_dataset()
        return progress_state(ds._config(), self._progress, ds.epoch, int(ds._control[1]), ds.manifest.num_samples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration deliver exactly the samples the checkpointed run had not delivered yet."""
        self._stream_dataset().load_state_dict(state)
        self._progress = None

    def _stream_dataset(self) -> StreamingDataset:
        if not self._streaming:
            raise ConfigError(
                "state_dict/load_state_dict need a StreamingDataset and a batch_size; for other datasets, "
                "checkpoint your sampler and dataset yourself"
            )
        return self.dataset

    def _batches(self, topology: tuple[int, int]) -> torch.utils.data.DataLoader:
        # One inner loader for the loader's life, so persistent workers survive from epoch to epoch.
        if self._inner is None or self._inner_topology != topology:
            view = self.dataset._as_batches(self.batch_size, self.drop_last, self._user_collate, topology,
                                            self.persistent_workers)
            self._inner = torch.utils.data.DataLoader(
                view, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                pin_memory=self.pin_memory, timeout=self.timeout, worker_init_fn=self.worker_init_fn,
                multiprocessing_context=self.multiprocessing_context, generator=self.generator,
                prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                pin_memory_device=self.pin_memory_device,
                in_order=True,  # checkpoints count batches in order; out-of-order delivery would break resume
            )
            self._inner_topology = topology
        return self._inner


class _StreamIterator:
    """One epoch of batches from the inner loader, counted for checkpoints."""

    def __init__(self, loader: DataLoader) -> None:
        ds: StreamingDataset = loader.dataset
        topology = workers.topology()  # here, in the training process, where the process group is visible
        self.dataset = ds
        self.progress = Progress(ds.epoch, int(ds._control[1]), loader.batch_size, topology[1])
        loader._progress = self.progress
        self.length = len(loader)
        self.finished = False
        self._loader = loader
        self._it = iter(loader._batches(topology))

    def __iter__(self) -> _StreamIterator:
        return self

    def __len__(self) -> int:
        return self.length

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self.finished = self.progress.done = True
            if self.dataset.epoch == self.progress.epoch:
                self.dataset.set_epoch(self.progress.epoch + 1)  # a new order next time, unless set_epoch says so
            workers.sweep()
            raise
        except BaseException as exc:
            # A dead worker, a timeout: stop the others now, or their exits keep firing torch's SIGCHLD check.
            # A checkpoint taken now still points just past the last batch delivered.
            self.finished = True
            # A broken pipe or socket can be the first sign of a worker dying: give its exit a moment to show.
            dead = self._dead_workers(wait=2.0 if isinstance(exc, (OSError, EOFError)) else 0.0)
            self._shutdown()
            if dead and not isinstance(exc, KeyboardInterrupt):
                # Whatever surfaced first (often a batch whose shared memory died with its worker), say why.
                raise RuntimeError(f"{dead}; the dataloader stopped (see the chained error)") from exc
            raise
        if isinstance(batch, workers.WorkerError):
            self.finished = True
            if not self._loader.persistent_workers:
                # Stop the workers now: left to the garbage collector (the traceback makes a reference cycle), the
                # queues close before torch's shutdown runs, and it waits seconds for workers that never hear it.
                self._shutdown()
            batch.reraise()
        self.progress.delivered += 1
        return batch

    def _shutdown(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # e.g. a queued batch of the dead worker cannot be unpickled; report the first error
                pass
        if self._loader._inner is not None:
            self._loader._inner._iterator = None  # persistent workers are gone: start fresh ones next time

    def _dead_workers(self, wait: float) -> str:
        procs = getattr(self._it, "_workers", [])
        deadline = time.monotonic() + wait
        while not any(p.exitcode for p in procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        dead = []
        for worker in procs:
            code = worker.exitcode
            if code is None or code == 0:
                continue
            why = f"is killed by signal: {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            dead.append(f"DataLoader worker (pid {worker.pid}) {why}")
        return ", ".join(dead)
