"""Checkpoints through stoker.DataLoader's workers for iterable datasets whose iterators checkpoint themselves.

A dataset qualifies (`is_resumable`) when it is an IterableDataset with `order_config()`, `epoch` and `set_epoch()`,
and `iter(dataset)` gives an iterator with `state_dict()` and `load_state_dict()` (called before its first item),
as `stoker.bucketing.bucketed.BucketedStream`'s does. Each DataLoader worker iterates its own copy of the dataset,
so each worker's iterator holds that worker's progress: here every item travels with its worker's iterator state
after it (`Checkpointed`), and with the stage seconds the worker spent since its previous message (the dataset's own
`stage_times()`, e.g. a BucketedStream's reads and bucketing, and `collate_fn`'s), which the loader adds up. The
training process delivers the items in torch's order -- round robin over the workers, skipping those that have
ended -- and keeps each worker's state as of the last item of it delivered.

A checkpoint is those states, which workers had ended and whose turn is next. Resuming gives each worker its state
back and continues the round robin where it stopped, so the rest of the epoch is exactly the items that had not
been delivered, in the same order. Which worker makes which item depends on the number of workers and on the rank,
so a checkpoint fits only the same ones (and the same `order_config()`); anything else is a StateError.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import IterableDataset, default_convert, get_worker_info

from stoker.checkpoint import check_checkpoint
from stoker.clock import StageClock, added, sum_times
from stoker.dataloader.workers import PickleSeconds, UnpickleStart, arrival_times, pin_timed
from stoker.errors import StateError, StokerError

STATE_VERSION = 1
KEYS = {"version", "config", "epoch", "turn", "workers"}


def is_resumable(dataset: Any) -> bool:
    """Whether `dataset` is an iterable dataset whose iterators checkpoint themselves (see the module's doc)."""
    return isinstance(dataset, IterableDataset) and hasattr(dataset, "epoch") and all(
        callable(getattr(dataset, name, None)) for name in ("order_config", "set_epoch"))


def loader_config(dataset: Any, num_workers: int, topology: tuple[int, int]) -> dict[str, Any]:
    """What the delivered order depends on: the dataset's `order_config()`, the number of workers, rank and world."""
    rank, world = topology
    return {"dataset": dataset.order_config(), "num_workers": int(num_workers), "rank": rank, "world": world}


@dataclass
class WorkerStates:
    """What a pass delivered: per worker (one in-process when there are no workers) the iterator state as of its
    last delivered item (None: from its start) and whether it ended; `turn` is the worker whose item is next."""

    epoch: int
    states: list[Any]
    ended: list[bool]
    turn: int = 0
    finished: bool = False

    @classmethod
    def fresh(cls, epoch: int, num_workers: int) -> WorkerStates:
        count = max(1, num_workers)
        return cls(epoch, [None] * count, [False] * count)

    def state(self, config: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint; after a finished pass, the start of the next epoch."""
        if self.finished:
            return WorkerStates.fresh(self.epoch + 1, len(self.states)).state(config)
        return {"version": STATE_VERSION, "config": dict(config), "epoch": self.epoch, "turn": self.turn,
                "workers": [{"state": s, "ended": e} for s, e in zip(self.states, self.ended)]}


def read_state(state: Any, config: dict[str, Any]) -> WorkerStates:
    """The progress a checkpoint holds, after checking that it was made under `config`."""
    check_checkpoint(state, what="DataLoader", keys=KEYS, version=STATE_VERSION, config=config,
                     settings="the dataset, its settings, the number of DataLoader workers and the rank")
    count = max(1, config["num_workers"])
    entries = state["workers"]
    if not isinstance(entries, list) or len(entries) != count or not all(
            isinstance(e, dict) and {"state", "ended"} <= set(e) for e in entries):
        raise StateError(f"DataLoader checkpoint holds {entries!r:.200} as the workers' states; expected a list of "
                         f"{count} entries {{'state': ..., 'ended': ...}}")
    turn = int(state["turn"])
    if not 0 <= turn < count:
        raise StateError(f"DataLoader checkpoint's turn {turn} is outside its {count} workers")
    return WorkerStates(int(state["epoch"]), [e["state"] for e in entries], [bool(e["ended"]) for e in entries], turn)


class Checkpointed:
    """Item number `number` of DataLoader worker `worker`, with that worker's iterator state after it; `end`: the
    worker's last message, which holds no item. `times`: the worker's stage seconds since its previous message;
    crossing processes adds "handoff" and "receive", pinning adds "pin" (as for `workers.Bundle`)."""

    def __init__(self, worker: int, number: int, state: Any, item: Any, end: bool = False,
                 times: dict[str, float] | None = None) -> None:
        self.worker, self.number, self.state, self.item, self.end = worker, number, state, item, end
        self.times = {} if times is None else times

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrived, (UnpickleStart(), self.worker, self.number, self.state, self.item, self.end, self.times,
                           PickleSeconds(time.perf_counter())))

    def pin_memory(self) -> Checkpointed:
        """What torch's pin-memory thread calls: the item pinned as torch pins a lone batch."""
        (item,), times = pin_timed([self.item], self.times)
        return Checkpointed(self.worker, self.number, self.state, item, self.end, times)


def _arrived(start: float, worker: int, number: int, state: Any, item: Any, end: bool, times: dict[str, float],
             pickled: float) -> Checkpointed:
    return Checkpointed(worker, number, state, item, end, arrival_times(times, pickled, start))


class WorkerView(IterableDataset):
    """What the inner torch DataLoader iterates: in each worker (or in this process), the dataset's items through
    `collate_fn` (None: torch's default_convert), as `Checkpointed` messages; `resume` holds each worker's entry of
    a checkpoint, used once."""

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any] | None, resume: WorkerStates | None) -> None:
        self.dataset, self.collate_fn, self.resume = dataset, collate_fn, resume

    def __iter__(self) -> Iterator[Checkpointed]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # Once per copy: persistent workers and later passes in this process start from the epoch's beginning.
        resume, self.resume = self.resume, None
        if resume is None:
            return _Tagged(self.dataset, self.collate_fn, worker, None, False)
        return _Tagged(self.dataset, self.collate_fn, worker, resume.states[worker], resume.ended[worker])

    def started(self) -> None:
        """Workers were started with this view: the resume they took along is spent here too."""
        self.resume = None


class _Tagged:
    """One worker's pass: its items, each with the iterator's state after it, then one end message; each message
    with the stage seconds spent since the previous one (the dataset's clocks and this pass's `collate_fn`)."""

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any] | None, worker: int, state: Any,
                 ended: bool) -> None:
        self.collate_fn, self.worker = collate_fn or default_convert, worker
        # The loader's collate_fn counts as "transform", as on StreamingDataset's path; torch's default_convert
        # (no collate_fn) as "collate", the batching's own.
        self.collate_stage = "collate" if collate_fn is None else "transform"
        self.clock = StageClock()
        own = getattr(dataset, "stage_times", None)
        self.dataset_times: Callable[[], dict[str, float]] | None = own if callable(own) else None
        self.seen = self.dataset_times() if self.dataset_times is not None else {}  # cumulative, in this process
        self.number = 0
        self.ended = ended
        self.iterator = None if ended else iter(dataset)
        if state is not None and self.iterator is not None:
            self.iterator.load_state_dict(state)

    def __iter__(self) -> _Tagged:
        return self

    def __next__(self) -> Checkpointed:
        if self.iterator is None:
            if self.ended:
                self.ended = False  # the end message goes once
                return Checkpointed(self.worker, self.number, None, None, end=True)
            raise StopIteration
        try:
            item = next(self.iterator)
        except StopIteration:
            self.iterator = None
            return Checkpointed(self.worker, self.number, None, None, end=True, times=self._take())
        start = time.perf_counter()
        batch = self.collate_fn(item)
        self.clock.add(self.collate_stage, time.perf_counter() - start)
        message = Checkpointed(self.worker, self.number, self.iterator.state_dict(), batch, times=self._take())
        self.number += 1
        return message

    def _take(self) -> dict[str, float]:
        # Stage seconds since the previous message: a few dict operations per batch, no clock reads.
        own = self.clock.take()
        if self.dataset_times is None:
            return own
        now = self.dataset_times()
        since, self.seen = added(now, self.seen), now
        return sum_times(since, own)


@dataclass
class ResumableIterator:
    """The training process's side of one pass: the inner loader's messages, delivered round robin over the workers
    from `progress.turn` on, each delivery recorded in `progress`; at the end the dataset moves to the next epoch,
    unless `set_epoch` was called meanwhile (as stoker.DataLoader does for a StreamingDataset)."""

    dataset: Any
    inner: Iterator[Checkpointed]
    progress: WorkerStates
    clock: StageClock  # the loader's: each message's stage seconds are added to it on arrival
    received: dict[tuple[int, int], Checkpointed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.progress.states)  # messages of each worker taken in this pass

    def __iter__(self) -> ResumableIterator:
        return self

    def __next__(self) -> Any:
        progress = self.progress
        count = len(progress.states)
        while not progress.finished:
            if all(progress.ended):
                progress.finished = True
                if self.dataset.epoch == progress.epoch:
                    self.dataset.set_epoch(progress.epoch + 1)
                break
            worker = progress.turn
            while progress.ended[worker]:
                worker = (worker + 1) % count
            message = self._message(worker)
            progress.turn = (worker + 1) % count
            if message.end:
                progress.ended[worker] = True
                continue
            progress.states[worker] = message.state
            return message.item
        raise StopIteration

    def _message(self, worker: int) -> Checkpointed:
        key = (worker, self.counts[worker])
        while key not in self.received:
            try:
                message = next(self.inner)
            except StopIteration:
                raise StokerError(f"DataLoader worker {worker} stopped without its end message") from None
            self.clock.merge(message.times)
            self.received[(message.worker, message.number)] = message
        self.counts[worker] += 1
        return self.received.pop(key)
