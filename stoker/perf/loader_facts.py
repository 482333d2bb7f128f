"""What the monitor reads from the loader it wraps: samples per batch, stage clocks, and the facts advice rests on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from stoker.perf import diagnosis
from stoker.perf.diagnosis import RunFacts
from stoker.perf.timing import usable_cores


def count_samples(batch: Any) -> int | None:
    """Return the number of samples in `batch`, or None if it cannot tell.

    A tensor or array counts its first dimension; a dict counts its first countable value; a list or tuple whose
    first element is a tensor, array, dict or sequence is read as the fields of one batch (inputs, targets) and
    counted by that element; any other list or tuple counts its length.
    """
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    if isinstance(batch, Mapping):
        for value in batch.values():
            count = count_samples(value)
            if count is not None:
                return count
        return None
    if isinstance(batch, (list, tuple)):
        if batch and (hasattr(batch[0], "shape") or isinstance(batch[0], (Mapping, list, tuple))):
            return count_samples(batch[0])
        return len(batch)
    return None


def sample_counter(batch_size: int | Callable[[Any], int] | None) -> Callable[[Any], int | None]:
    if batch_size is None:
        return count_samples
    if callable(batch_size):
        return batch_size
    return lambda _batch: batch_size


def stage_source(loader: Any) -> Any:
    """The loader's (or its dataset's) `stage_times`: a method or a plain dict; None when it has none."""
    source = getattr(loader, "stage_times", None)
    if source is None:
        source = getattr(getattr(loader, "dataset", None), "stage_times", None)
    return source


def worker_starts(loader: Any) -> Callable[[], tuple[int, int]] | None:
    """() -> (times the loader started workers, batches of the pass before the newest ones' first), read from
    stoker.DataLoader's `worker_starts` / `workers_first_batch`; None for a loader that does not report them."""
    if not hasattr(loader, "worker_starts") or not hasattr(loader, "workers_first_batch"):
        return None
    return lambda: (loader.worker_starts, loader.workers_first_batch)


def run_facts(loader: Any) -> RunFacts:
    """What the advice may rely on, read from public attributes of the loader and its dataset."""
    from stoker import storage

    dataset = getattr(loader, "dataset", None)
    if not hasattr(dataset, "manifest"):  # a wrapper (BucketedStream): the shards are its wrapped dataset's
        dataset = getattr(dataset, "dataset", dataset)
    workers = getattr(loader, "num_workers", None)
    kind = getattr(getattr(dataset, "manifest", None), "kind", None)
    source = getattr(dataset, "source", None)
    read = getattr(dataset, "read", None)
    collate = getattr(loader, "collate_fn", None)
    backend = getattr(collate, "backend", None) if type(collate).__module__.startswith("stoker.augment.") else None
    return RunFacts(
        num_workers=workers if isinstance(workers, int) else None,
        usable_cores=usable_cores(),
        cuda=torch.cuda.is_available(),
        has_stage_times=stage_source(loader) is not None,
        remote=isinstance(source, str) and not storage.is_local(source),
        source=storage.redact(source) if isinstance(source, str) else None,
        parallel_reads=getattr(read, "parallel_reads", None),
        prefetch_shards=getattr(read, "prefetch_shards", None),
        part_size=getattr(read, "part_size", None),
        shard_bytes=_mean_shard_bytes(dataset),
        cache_dir=getattr(dataset, "cache_dir", None),
        backend=backend if backend in diagnosis.BACKENDS else None,
        pin_memory=bool(getattr(loader, "pin_memory", False)),
        images=None if kind is None else kind == "image",
        sample_transform=getattr(dataset, "transform", None) is not None if hasattr(dataset, "transform") else None,
    )


def tuning(loader: Any) -> dict[str, Any] | None:
    """The loader's `tuning_report()` as a dict with its text under "summary" (stoker.DataLoader with
    num_workers="auto"), else None; a dict, so that the report stays plain data (JSON, CSV, all-ranks)."""
    tuning_report = getattr(loader, "tuning_report", None)
    report = tuning_report() if callable(tuning_report) else None
    return None if report is None else {"summary": str(report), **report.to_dict()}


def _mean_shard_bytes(dataset: Any) -> float | None:
    shards = getattr(getattr(dataset, "manifest", None), "shards", None)
    sizes = [s.bytes for s in shards or () if getattr(s, "rows", 0)]
    return sum(sizes) / len(sizes) if sizes else None
