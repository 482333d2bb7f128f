"""stoker.DataLoader: torch's DataLoader, argument for argument, with a fast and resumable path for StreamingDataset.

Any other dataset goes through torch's own machinery untouched (it already fetches with `__getitems__` when a
dataset has it), so samplers, batch samplers, collate functions, worker seeding, timeouts and errors behave exactly
as in torch; an iterable dataset whose iterators checkpoint themselves (BucketedStream, with batch_size=None) goes
through it too, one message per batch carrying its worker's state, so that it can be checkpointed (`resumable.py`).
For a StreamingDataset with a batch size, workers build whole batches instead of single samples: each worker
gathers its batch's rows straight from the mapped record batches, collates column by column, and sends the
variable-width data through a reusable shared-memory slab (see `workers.py`). The main process counts delivered
batches, which is all a checkpoint needs (see `order.py`).

`num_workers="auto"` and/or `prefetch_factor="auto"` hand those settings to `autotune.Tuner`: the iterator times
each step, and when the tuner asks for another setting it re-deals the rest of the epoch to new workers at a batch
boundary, as a resume would, so the batches delivered stay exactly those of a fixed setting (docs/autotune.md).
"""

from __future__ import annotations

import collections
import gc
import math
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch.utils.data

from stoker import storage
from stoker.dataloader import autotune, order, resumable, workers
from stoker.clock import StageClock
from stoker.dataloader.stages import Progress, progress_state
from stoker.dataloader.stream import BatchPlan, StreamingDataset
from stoker.errors import ConfigError


BUNDLE_SAMPLES = 256  # a worker sends batches in bundles of about this many samples...
BUNDLE_BYTES = 32 << 20  # ...and at most about this many bytes
MAX_BUNDLE = 8


def bundle_size(batch_size: int, num_workers: int, mean_sample_bytes: float) -> int:
    """Batches per message from a worker: one message costs the training process about a millisecond of CPU, so
    small batches travel several at a time (`workers.Bundle`); big ones (>= 256 samples or ~32 MB) one by one."""
    if num_workers == 0:
        return 1
    by_bytes = BUNDLE_BYTES // max(1, int(batch_size * mean_sample_bytes))
    return max(1, min(MAX_BUNDLE, BUNDLE_SAMPLES // batch_size, by_bytes))


def inner_prefetch(prefetch_factor: int, bundle: int) -> int:
    """Messages in flight per worker for `prefetch_factor` batches: with bundles, at least two, so that a worker
    builds its next bundle while the last one waits (with one, workers and the training loop take turns: 3 workers
    at 20 ms per batch fed an 8 ms step 71 batches/s with one message in flight, 115/s with two)."""
    if bundle == 1:
        return prefetch_factor
    return max(2, math.ceil(prefetch_factor / bundle))


def _passthrough(batch: Any) -> Any:
    # Workers already collate; torch's default_convert would walk every batch for nothing.
    return batch


# Covariant like torch's own, so `stoker.DataLoader[T]` annotates and subscripts the same way.
_T_co = TypeVar("_T_co", covariant=True)


class DataLoader(torch.utils.data.DataLoader[_T_co]):
    """Drop-in torch.utils.data.DataLoader; batches of a StreamingDataset are built in workers and resumable."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int | str = 0,
        collate_fn: Any = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Any = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | str | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        memory_budget: str | int = autotune.DEFAULT_BUDGET,
        autotune_config: autotune.AutotuneConfig | None = None,
    ) -> None:
        streaming = isinstance(dataset, StreamingDataset) and batch_size is not None
        self._tuner = _make_tuner(dataset if streaming else None, batch_size, num_workers, prefetch_factor,
                                  memory_budget, autotune_config)
        if self._tuner is not None:
            num_workers = self._tuner.setting.workers
            prefetch_factor = self._tuner.setting.prefetch
        # The signature mirrors torch's on purpose; torch validates every combination exactly as it always does.
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last,
            timeout, worker_init_fn, multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device, in_order=in_order,
        )
        self._streaming = streaming
        # An iterable dataset whose iterators checkpoint themselves (BucketedStream): one message per item, with its
        # worker's state, so that this loader can checkpoint (`resumable.py`).
        # (A StreamingDataset without a batch_size goes through torch's own machinery, as documented.)
        self._resumable = (batch_size is None and not isinstance(dataset, StreamingDataset)
                           and resumable.is_resumable(dataset))
        self._resume: resumable.WorkerStates | None = None  # the last pass's progress, or a loaded checkpoint's
        self._resume_pending = False  # whether `_resume` is a loaded checkpoint the next pass starts from
        self._user_collate = collate_fn
        self._inner: torch.utils.data.DataLoader | None = None
        self._inner_key: tuple[Any, ...] | None = None
        self._inner_started = False  # whether the inner loader's iterator (and its persistent workers) exists
        self._worker_starts = 0  # times a set of worker processes was started
        self._workers_first_batch = 0  # batches of the pass delivered before the current workers' first one
        self._bundle = 1  # batches per message of the inner loader
        self._progress: Progress | None = None
        self._clock = StageClock()  # stage seconds of this loader, its workers' included
        self.skipped = 0  # damaged samples its workers left out (ReadOptions(on_error="skip")), each warned about

    def __iter__(self) -> Any:
        if self._resumable:
            return self._resumable_pass()
        if not self._streaming:
            return _forking(super().__iter__)
        # A pass abandoned after a re-deal left the dataset's start mid-epoch: start where the epoch started.
        self.dataset.position.rewind()
        iterator = _StreamIterator(self, workers.topology())  # the topology here, where the process group is visible
        self._progress = iterator.progress
        return iterator

    def __len__(self) -> int:
        if not self._streaming:
            return super().__len__()
        rank, world = workers.topology()
        remaining = self.dataset.manifest.num_samples - self.dataset.position.epoch_start
        return order.rank_units(remaining, self.batch_size, rank, world, self.drop_last or self.dataset.drop_last)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of this rank's progress. A StreamingDataset's: {version, config, epoch, consumed}, valid for any
        rank to load; a resumable iterable's (BucketedStream): each worker's state, for this rank and worker count."""
        if self._resumable:
            config = resumable.loader_config(self.dataset, self.num_workers, workers.topology())
            progress = self._resume or resumable.WorkerStates.fresh(self.dataset.epoch, self.num_workers)
            return progress.state(config)
        ds = self._stream_dataset()
        position = ds.position
        return progress_state(ds.order_config(), self._progress, position.epoch, position.epoch_start,
                              ds.manifest.num_samples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration deliver exactly the samples the checkpointed run had not delivered yet."""
        if self._resumable:
            config = resumable.loader_config(self.dataset, self.num_workers, workers.topology())
            self._resume = resumable.read_state(state, config)
            self._resume_pending = True
            self.dataset.set_epoch(self._resume.epoch)
            return
        self._stream_dataset().load_state_dict(state)
        self._progress = None

    def stage_times(self) -> dict[str, float]:
        """Busy seconds per pipeline stage since this loader was built, summed over its workers, in this process.

        Keys (`stoker.clock.STAGES`) appear once their stage ran. A StreamingDataset's stages and a BucketedStream's
        (any resumable iterable's: its own `stage_times()` and `collate_fn`) are timed in the workers and sent with
        each batch; another dataset's only when it reports them itself (`stage_times()`) and runs without workers,
        since torch's own workers have no way to send them."""
        if self._streaming or self._resumable:
            return self._clock.totals()
        own = getattr(self.dataset, "stage_times", None)
        return own() if own is not None and self.num_workers == 0 else {}

    @property
    def worker_starts(self) -> int:
        """Times this loader started worker processes for a StreamingDataset or a resumable iterable (BucketedStream):
        each pass without persistent workers, each re-deal of `num_workers="auto"`, each pass of a resumable iterable
        resumed from a checkpoint; 0 for other datasets."""
        return self._worker_starts

    @property
    def workers_first_batch(self) -> int:
        """Batches of the current pass delivered before the first one of the workers last started."""
        return self._workers_first_batch

    def tuning_report(self) -> autotune.TuningReport | None:
        """What `num_workers="auto"`/`prefetch_factor="auto"` chose and why (None for fixed settings)."""
        return None if self._tuner is None else self._tuner.report()

    def _stream_dataset(self) -> StreamingDataset:
        if not self._streaming:
            raise ConfigError(
                "state_dict/load_state_dict need a StreamingDataset and a batch_size, or a BucketedStream (any "
                "iterable dataset whose iterators checkpoint themselves) and batch_size=None; for other datasets, "
                "checkpoint your sampler and dataset yourself"
            )
        return self.dataset

    def _batches(self, topology: tuple[int, int]) -> torch.utils.data.DataLoader:
        # One inner loader for the loader's life (or until the tuner changes its settings), so persistent workers
        # survive from epoch to epoch.
        key = (topology, self.num_workers, self.prefetch_factor)
        if self._inner is None or self._inner_key != key:
            bundle = self._bundle = bundle_size(self.batch_size, self.num_workers, _mean_sample_bytes(self.dataset))
            persistent = self.persistent_workers and self.num_workers > 0
            plan = BatchPlan(self.batch_size, self.drop_last, self._user_collate, topology, persistent, bundle)
            view: Any = self.dataset.batches(plan, self._clock)
            if self._tuner is not None:
                view = autotune.Timed(view, self._tuner.clock)
            prefetch = None if self.num_workers == 0 else inner_prefetch(self.prefetch_factor or 2, bundle)
            self._inner = torch.utils.data.DataLoader(
                view, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                pin_memory=self.pin_memory, timeout=self.timeout, worker_init_fn=self.worker_init_fn,
                multiprocessing_context=self.multiprocessing_context, generator=self.generator,
                prefetch_factor=prefetch, persistent_workers=persistent,
                pin_memory_device=self.pin_memory_device,
                in_order=True,  # checkpoints count batches in order; out-of-order delivery would break resume
            )
            self._inner_key = key
            self._inner_started = False
        return self._inner

    def _resumable_pass(self) -> resumable.ResumableIterator:
        """A pass over a resumable iterable: from a loaded checkpoint (on new workers, which take it along), else
        from the start of the dataset's epoch (persistent workers kept)."""
        epoch = self.dataset.epoch
        resume = self._resume if self._resume_pending and self._resume.epoch == epoch else None
        self._resume_pending = False  # a `set_epoch` to another epoch since the load discards it
        fresh = self._inner is None or resume is not None
        if fresh:
            self._inner = torch.utils.data.DataLoader(
                resumable.WorkerView(self.dataset, self._user_collate, resume), batch_size=None, num_workers=self.num_workers,
                collate_fn=_passthrough, pin_memory=self.pin_memory, timeout=self.timeout,
                worker_init_fn=self.worker_init_fn, multiprocessing_context=self.multiprocessing_context,
                generator=self.generator, prefetch_factor=self.prefetch_factor,
                persistent_workers=self.persistent_workers, pin_memory_device=self.pin_memory_device,
                in_order=True,  # the round robin over workers is what a checkpoint records
            )
        inner = _forking(self._inner.__iter__)
        if self.num_workers and (fresh or not self.persistent_workers):  # persistent ones serve every later pass
            self._worker_starts += 1
            self._workers_first_batch = 0
        self._inner.dataset.started()
        self._resume = resume or resumable.WorkerStates.fresh(epoch, self.num_workers)
        return resumable.ResumableIterator(self.dataset, inner, self._resume, self._clock)

    def _start_batches(self, topology: tuple[int, int], first_batch: int = 0) -> tuple[Any, bool]:
        """(iterator of the inner loader, whether its workers are new rather than persistent ones reused);
        `first_batch`: batches of the pass delivered before the new workers' first one."""
        inner = self._batches(topology)
        fresh = not (self._inner_started and inner.persistent_workers)
        self._inner_started = True
        if fresh and self.num_workers:
            self._worker_starts += 1
            self._workers_first_batch = first_batch
        return _start(inner, self._tuner is not None), fresh

    def _workers_stopped(self) -> None:
        """The inner loader's workers were shut down: the next pass starts new ones (persistent ones are gone)."""
        self._inner = None

    def _apply_setting(self, setting: autotune.Setting) -> None:
        """The tuner's new setting, used by the next inner loader."""
        self.num_workers = setting.workers
        self.prefetch_factor = setting.prefetch if setting.workers else None


def _mean_sample_bytes(dataset: StreamingDataset) -> float:
    manifest = dataset.manifest
    return sum(s.bytes for s in manifest.shards) / max(1, manifest.num_samples)


def _make_tuner(dataset: StreamingDataset | None, batch_size: int | None, num_workers: Any, prefetch_factor: Any,
                memory_budget: str | int, config: autotune.AutotuneConfig | None) -> autotune.Tuner | None:
    budget = autotune.memory_budget(memory_budget)  # a bad budget string fails here, tuned or not
    auto_workers, auto_prefetch = num_workers == autotune.AUTO, prefetch_factor == autotune.AUTO
    if not (auto_workers or auto_prefetch):
        return None
    if dataset is None:
        raise ConfigError(
            "num_workers='auto' and prefetch_factor='auto' need a stoker.StreamingDataset and a batch_size (its "
            "order does not depend on the worker count, so workers can change mid-epoch); for other datasets "
            "run `stoker bench --tune` on your shards and pass the numbers it recommends"
        )
    return autotune.Tuner(config or autotune.AutotuneConfig(), budget, auto_workers, auto_prefetch,
                          None if auto_workers else num_workers, None if auto_prefetch else prefetch_factor,
                          bundle_size(batch_size, 1, _mean_sample_bytes(dataset)))


class _StreamIterator:
    """One epoch of batches from the inner loader, counted for checkpoints."""

    def __init__(self, loader: DataLoader, topology: tuple[int, int]) -> None:
        ds: StreamingDataset = loader.dataset
        self.dataset = ds
        self.topology = topology
        self.progress = Progress(ds.epoch, ds.position.start, loader.batch_size, topology[1])
        self.length = len(loader)
        self.finished = False
        self._loader = loader
        self._clock = loader._clock
        started = time.perf_counter()
        self._it, fresh = loader._start_batches(topology)
        self._workers = loader.num_workers
        self._base = 0  # batches delivered before the current inner iterator started (re-deals)
        self._bundled: dict[tuple[int, int], Any] = {}  # (worker, its batch number) -> batch, from bundles
        self._carried: collections.deque[Any] = collections.deque()  # received before a re-deal, delivered first
        self._tuner = loader._tuner
        if self._tuner is not None:
            self._tuner.segment_started(ds.epoch, 0, autotune.worker_pids(self._it), fresh,
                                        time.perf_counter() - started)

    def _next_batch(self) -> Any:
        """The next batch in order: this rank's i-th batch is batch i // workers of worker i % workers (`order.Deal`),
        and workers send theirs in bundles (`workers.Bundle`), round robin."""
        if self._carried:
            return self._carried.popleft()
        key = self._key(self.progress.delivered - self._base)
        while key not in self._bundled:
            bundle = next(self._it)
            if not isinstance(bundle, workers.Bundle):
                return bundle  # sent on its own (an error outside a bundle)
            self._clock.merge(bundle.times)
            self._loader.skipped += bundle.skipped
            for n, item in enumerate(bundle.items):
                self._bundled[(bundle.worker, bundle.first + n)] = item
        return self._bundled.pop(key)

    def __iter__(self) -> _StreamIterator:
        return self

    def __len__(self) -> int:
        return self.length

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        asked = self._tune() if self._tuner is not None else 0.0
        try:
            batch = self._next_batch()
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
        if self._tuner is not None:
            self._tuner.delivered(batch, asked)
        return batch

    def _tune(self) -> float:
        """Time the step that just ended and, when the tuner asks for another setting, re-deal (see `_redeal`)."""
        tuner = self._tuner
        now = tuner.before_next()
        if tuner.due(now) and (self._next_in_hand() or tuner.first_decision and not self._carried):
            setting = tuner.decide(now, self.length - self.progress.delivered, self.length)
            if setting is not None:
                self._redeal(setting)
        return now

    def _next_in_hand(self) -> bool:
        """Whether the next batch has arrived (always, when batches travel one by one). Re-dealing then, rather than
        while a worker is still building the bundle that holds it, carries the most batches over and throws away
        the least work. The first decision does not wait for it: the start's workers are then building their second
        bundle (two batches each), and waiting keeps the loop at the pace the decision found too slow, while the
        work thrown away is at most those two batches per worker."""
        if self._carried:
            return False  # still delivering what the last re-deal carried over
        if not self._workers or self._loader._bundle == 1:
            return True
        return self._key(self.progress.delivered - self._base) in self._bundled

    def _key(self, i: int) -> tuple[int, int]:
        # The current workers' i-th batch is batch i // workers of worker i % workers (`order.Deal`); without
        # workers, this process makes them all.
        if not self._workers:
            return 0, i
        return i % self._workers, i // self._workers

    def _redeal(self, setting: autotune.Setting) -> None:
        """Stop the workers and deal the rest of the epoch to `setting`, as a resume from a checkpoint taken now
        would: the global order does not depend on the worker count (`order.py`), so the batches are the same."""
        loader, ds, progress = self._loader, self.dataset, self.progress
        started = time.perf_counter()
        # Batches already received in bundles are kept and delivered first: the new workers start after them, so
        # no work is made twice and their start-up hides behind the training steps on these.
        i = progress.delivered - self._base + len(self._carried)
        while self._workers and self._key(i) in self._bundled:
            self._carried.append(self._bundled.pop(self._key(i)))
            i += 1
        if storage.is_local(ds.source):
            # Their output is discarded: stopping them now saves waiting for the bundles they are building (up to
            # a second). Local reads leave nothing half-written; remote ones may be filling the cache, so those
            # workers are asked to stop and finish their current batch.
            _kill_workers(self._it)
        self._shutdown()
        position = order.consumed(progress.start, progress.delivered + len(self._carried), progress.block,
                                  progress.world, ds.manifest.num_samples)
        ds.position.continue_at(position)
        loader._apply_setting(setting)
        self._it, _ = loader._start_batches(self.topology, progress.delivered + len(self._carried))
        self._workers, self._base = setting.workers, progress.delivered + len(self._carried)
        self._bundled.clear()
        self._tuner.segment_started(progress.epoch, progress.delivered, autotune.worker_pids(self._it), True,
                                    time.perf_counter() - started, len(self._carried))

    def _shutdown(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # e.g. a queued batch of the dead worker cannot be unpickled; report the first error
                pass
        self._loader._workers_stopped()

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


def _kill_workers(iterator: Any) -> None:
    """SIGKILL the workers of a torch DataLoader iterator, after telling torch's SIGCHLD check they may die."""
    if getattr(iterator, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()


def _start(inner: torch.utils.data.DataLoader, tuned: bool) -> Any:
    """iter(inner); a tuned loader may run more workers than cores on purpose (workers that wait on I/O or sleep),
    so torch's warning about that is not shown for it."""
    if not tuned:
        return _forking(inner.__iter__)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        return _forking(inner.__iter__)


def _forking(start: Callable[[], Any]) -> Any:
    """start() (which starts a loader's workers) with the garbage collector's objects frozen while they fork.

    A forked worker's first full collection otherwise walks every object inherited from the training process
    (torch and all), writing to each page it visits: copy-on-write copies of hundreds of MB, measured as a
    0.4 s stall inside a worker's first batch. Frozen objects are never collected in the workers; this process
    unfreezes them at once (the recipe of the `gc.freeze` documentation). A process that froze objects itself
    manages freezing: it is left alone.
    """
    if gc.get_freeze_count():
        return start()
    gc.freeze()
    try:
        return start()
    finally:
        gc.unfreeze()
