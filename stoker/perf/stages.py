"""The stages `stoker bench` times on a packed dataset, each alone for a bounded time:

    raw read   plain sequential read of the shard files, page cache dropped first: the storage speed of light
    read       stoker reading the same shards into sample dicts (also cold)
    decode     reduced-size JPEG decode, as the Pillow backend does it             } timed per core with the
    augment    the rest of the Pillow backend's real `render` (crop, resize, flip, } backend's own code, then
               jitter)                                                             } multiplied by the loader
    collate    stacking the rendered samples into the batch                        } workers
    h2d        pinned host-to-device copy of a batch (only with a CUDA GPU)
    loader     the real loader end to end, with its workers
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from stoker import storage
from stoker.errors import ConfigError
from stoker.perf.loaders import PREFETCH, count_items, make_loader
from stoker.perf.reference import stage_limits
from stoker.perf.timing import Stage, StageResult, time_stage, unavailable, usable_cores

DEFAULT_SECONDS = 3.0
_CHUNK = 8 << 20  # raw reads: large sequential requests, as `dd bs=8M` would do
_BUFFERED_SAMPLES = 512  # samples held in memory for the CPU stages, so they never touch storage
# The loader's clocks of moving batches (partly in the training process), not its workers' stage work.
_HANDOFF_STAGES = ("handoff", "receive", "pin")
MIN_LOADER_BATCHES = 20  # fewer batches per round and the loader's rate is mostly its start-up and epoch ends


@dataclass(frozen=True)
class BenchOptions:
    """How `bench_dataset` measures: time per stage, loader shape and the image transform."""

    seconds: float = DEFAULT_SECONDS
    batch_size: int | None = None  # None: 64 images or 32 text samples
    workers: int | None = None  # loader workers; None: the cores this process may use
    size: int = 224  # output side of the image transform
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Worded as `name=value` so that `stoker bench` shows its own flags instead (`cli.cli_wording`).
        if not self.seconds > 0:
            raise ConfigError(f"seconds={self.seconds} must be positive")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers={self.workers} must be 0 or more")

    def batch(self, image: bool) -> int:
        """Samples per batch: `batch_size`, else 64 images or 32 text samples."""
        return self.batch_size or (64 if image else 32)


def _shard_urls(source: str, manifest: Any) -> list[str]:
    return [storage.join(source, s.name) for s in manifest.shards if s.rows]


def _drop_page_cache(path: str) -> None:
    # Without this the second pass reads RAM, not storage; files still mapped elsewhere may stay cached.
    with contextlib.suppress(AttributeError, OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_read(source: str, manifest: Any, options: BenchOptions, bytes_per_item: float) -> StageResult:
    """Speed of light of storage: the shard files read front to back with large requests, nothing else."""
    urls = itertools.cycle(_shard_urls(source, manifest))
    local = storage.is_local(source)
    buffer = bytearray(_CHUNK)

    def step() -> tuple[int, int]:
        url = next(urls)
        if local:
            path = storage.local_path(url)
            _drop_page_cache(path)
            nbytes = 0
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    nbytes += n
        else:
            fs, path = storage.filesystem(url, options.storage_options)
            nbytes = len(fs.cat_file(path))
        return round(nbytes / bytes_per_item), nbytes

    how = "sequential 8 MB reads, page cache dropped" if local else "whole-object GETs, one connection"
    result = time_stage(Stage("raw read", step, note=f"speed of light: {how}"), options.seconds)
    return replace(result, reference=True)


def _read_step(source: str, manifest: Any, options: BenchOptions, image: bool) -> Callable[[], tuple[int, int]]:
    """One sample per call from stoker's StreamingDataset in this process, cold cache at each pass."""
    from stoker.dataloader.stream import StreamingDataset  # imported before the clock starts: it loads torch

    column = "image" if image else "tokens"
    local = storage.is_local(source)

    def passes() -> Iterator[dict[str, Any]]:
        while True:  # the dataset holds samples (checked by the caller), so each pass yields some
            with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:  # remote: a fresh download each pass
                for url in _shard_urls(source, manifest) if local else ():
                    _drop_page_cache(storage.local_path(url))
                yield from StreamingDataset(source, shuffle=False, storage_options=options.storage_options,
                                            cache_dir=None if local else tmp, columns=[column])

    samples = passes()

    def step() -> tuple[int, int]:
        value = next(samples)[column]
        return (1, len(value)) if image else (len(value), value.nbytes)

    return step


def _buffer_samples(source: str, manifest: Any, options: BenchOptions) -> list[dict[str, Any]]:
    """Up to `_BUFFERED_SAMPLES` samples in memory, read with the format layer (which every install has)."""
    from stoker.formats.shard import batch_to_samples, open_shard

    samples: list[dict[str, Any]] = []
    for url in _shard_urls(source, manifest):
        where = storage.local_path(url) if storage.is_local(url) else storage.read_bytes(url, options.storage_options)
        with open_shard(where, name=url.rsplit("/", 1)[-1]) as reader:
            for batch in reader.iter_batches():
                samples += batch_to_samples(batch)
                if len(samples) >= _BUFFERED_SAMPLES:
                    return samples[:_BUFFERED_SAMPLES]
    return samples


def _batches(samples: list[dict[str, Any]], batch: int) -> Iterator[list[dict[str, Any]]]:
    """Endless batches of `batch` samples, cycling over the buffer."""
    for start in itertools.count(0, batch):
        yield [samples[(start + i) % len(samples)] for i in range(batch)]


def _pad_step(samples: list[dict[str, Any]], batch: int) -> Callable[[], tuple[int, int]]:
    from stoker.bucketing.collate import pad_collate

    collate, batches = pad_collate(), _batches(samples, batch)

    def step() -> tuple[int, int]:
        out = collate(next(batches))
        return int(out["lengths"].sum()), out["input_ids"].numel() * out["input_ids"].element_size()

    return step


def _image_stages(samples: list[dict[str, Any]], options: BenchOptions, batch: int, lanes: int) -> list[StageResult]:
    """decode, augment and collate for images, timed per core with the Pillow backend's own code."""
    import torch

    from stoker.perf.timing import ROUNDS, STABLE_SPREAD, spread

    names = ("decode", "augment", "collate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "per core" means one core: a loader worker also runs torch on one thread
    try:
        rounds = [_time_pil_pieces(samples, options, batch, options.seconds / ROUNDS) for _ in range(ROUNDS)]
    except Exception as exc:  # noqa: BLE001 - e.g. the augment package missing or changed; say so per stage
        return [unavailable(name, f"{type(exc).__name__}: {exc}") for name in names]
    finally:
        torch.set_num_threads(threads)
    out = []
    items = sum(i for i, _ in rounds)
    for name in names:
        # augment is the difference of two timings: a round can come out at or below zero under noise,
        # so the rate is taken over all rounds together and the spread over the rounds that measured something.
        total = sum(s[name] for _, s in rounds)
        per_lane = items / total if total > 0 else math.inf
        rates = [i / s[name] for i, s in rounds if s[name] > 0]
        scatter = spread(rates) if len(rates) > 1 else None
        stable = len(rates) == len(rounds) and scatter is not None and scatter <= STABLE_SPREAD
        notes = [f"x {lanes} workers"] if lanes > 1 else []
        notes.append({"decode": "header probe + reduced-size decode", "augment": "render() minus its decode",
                      "collate": "stacking the rendered batch"}[name])
        limits = stage_limits("decode") if name == "decode" else ()
        if limits:
            notes.append(f"published: {limits[0].low:,.0f}-{limits[0].high:,.0f} img/s per core")
        if not stable:
            how = f"by {scatter:.0%}" if scatter is not None and len(rates) == len(rounds) else "in sign"
            notes.append(f"noisy: rounds differ {how} (rate over all rounds)")
        if not math.isfinite(per_lane):
            out.append(unavailable(name, "render() took no longer than its decode alone: within the noise"))
            continue
        out.append(StageResult(name, per_lane * lanes, per_lane, lanes, None, items, total, "; ".join(notes),
                               spread=scatter, rounds=len(rounds), stable=stable))
    return out


def _time_pil_pieces(samples: list[dict[str, Any]], options: BenchOptions, batch: int,
                     seconds: float) -> tuple[int, dict[str, float]]:
    """(images, seconds per piece) of the real Pillow backend on in-memory batches for about `seconds`.

    Two timings of each sample: its decode alone (header probe and `decode_for_box`) and its whole real `render`
    (decode included); augment is render minus decode. Collate is stacking the rendered samples into the uint8
    batch with its labels, as the transform hands it out.
    """
    import torch

    from stoker.augment.base import Planned
    from stoker.augment.decode import decode_for_box, probe
    from stoker.augment.params import sample_params, sample_rng
    from stoker.augment.pil import render
    from stoker.augment.spec import TransformSpec

    spec = TransformSpec(size=options.size)
    out_size = (spec.width, spec.height)
    decode = rendered = stacking = 0.0
    images = 0
    deadline = time.perf_counter() + seconds
    for epoch, group in enumerate(_batches(samples, batch)):
        pixels = []
        for sample in group:
            t0 = time.perf_counter()
            image, header = probe(sample["image"], spec.max_pixels)
            params = sample_params(spec, sample_rng(0, epoch, sample), header.width, header.height)
            decode_for_box(image, header, params.box, out_size)
            t1 = time.perf_counter()
            image, header = probe(sample["image"], spec.max_pixels)
            pixels.append(render(Planned(sample, image, header, params), out_size))
            t2 = time.perf_counter()
            decode, rendered = decode + t1 - t0, rendered + t2 - t1
        t0 = time.perf_counter()
        torch.stack(pixels)
        torch.tensor([int(s["label"]) for s in group], dtype=torch.int64)
        stacking += time.perf_counter() - t0
        images += len(group)
        if time.perf_counter() >= deadline:
            break
    return images, {"decode": decode, "augment": rendered - decode, "collate": stacking}


def _h2d(samples: list[dict[str, Any]], image: bool, options: BenchOptions, batch: int) -> StageResult:
    """Pinned host-to-device copy of one batch as the loader hands it out (uint8 images or int64 tokens)."""
    import torch

    if not torch.cuda.is_available():
        return unavailable("h2d", "no CUDA GPU on this machine")
    if image:
        host = torch.zeros((batch, 3, options.size, options.size), dtype=torch.uint8)
        count = batch
    else:
        from stoker.bucketing.collate import pad_collate

        padded = pad_collate()(next(_batches(samples, batch)))
        host, count = padded["input_ids"], int(padded["lengths"].sum())
    host = host.pin_memory()
    host.to("cuda", non_blocking=True)  # first copy creates the CUDA context: not part of the rate
    torch.cuda.synchronize()

    def step() -> tuple[int, int]:
        host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        return count, host.numel() * host.element_size()

    limits = stage_limits("h2d")
    note = f"published: {limits[0].low / 1e9:g}-{limits[-1].high / 1e9:g} GB/s pinned" if limits else ""
    return time_stage(Stage("h2d", step, note=note), options.seconds)


def _loader(source: str, options: BenchOptions, image: bool, batch: int, workers: int,
            epoch_batches: int) -> StageResult:
    """The real loader end to end: StreamingDataset, shuffled, with `workers` worker processes."""
    try:
        loader, name = make_loader(source, image=image, batch_size=batch, workers=workers, size=options.size,
                                   storage_options=options.storage_options)
        batches = iter(loader)
        start = time.perf_counter()
        next(batches)  # worker start-up and first shard opening: reported, not part of the rate
        first = time.perf_counter() - start
        # Batches prefetched during start-up would count as free: drain them before the clock starts.
        for _ in range(workers * PREFETCH):
            got = next(batches, None)
            batches = iter(loader) if got is None else batches
    except Exception as exc:  # noqa: BLE001 - reported in place of the stage
        return unavailable("loader", f"{type(exc).__name__}: {exc}")
    counted = 0

    def step() -> tuple[int, int]:
        nonlocal batches, counted
        got = next(batches, None)
        if got is None:  # epoch over: the next pass reuses the persistent workers
            batches = iter(loader)
            return 0, 0
        counted += 1
        return count_items(got, image), 0

    note = f"end to end: {name}, {workers} workers, batch {batch}; first batch after {first:.2f} s"
    clocks = getattr(loader, "stage_times", None)
    before = clocks() if clocks is not None else None
    try:
        result = time_stage(Stage("loader", step, note=note), options.seconds)
        after = clocks() if clocks is not None else None
    finally:
        del batches, loader  # shuts the worker processes down now, not at interpreter exit
    if before is not None and after is not None and result.seconds > 0:
        # The workers' own clocks: busy in their stages nearly all the time means the loader's time is in the
        # stages (slower than alone when the cores are shared), not lost between them.
        work = sum(after[k] - before.get(k, 0.0) for k in after if k not in _HANDOFF_STAGES)
        busy = min(1.0, work / (max(workers, 1) * result.seconds))
        result = replace(result, busy=busy, note=f"{result.note}; workers busy {busy:.0%} of the time in stages")
    per_round = counted / max(result.rounds, 1)
    short = []
    if per_round < MIN_LOADER_BATCHES:
        short.append(f"too short to judge: {per_round:.0f} batches per round (at least {MIN_LOADER_BATCHES}); "
                     "raise seconds (--seconds on the command line)")
    if epoch_batches < 2 * max(1, workers) * PREFETCH:
        short.append(f"too small to judge: {epoch_batches} batches per epoch, so start-up and epoch ends dominate; "
                     "bench a larger dataset")
    if short:
        result = replace(result, note="; ".join([result.note, *short]), stable=False)
    return result


def dataset_stages(source: str, manifest: Any, options: BenchOptions) -> list[StageResult]:
    """Time every stage of loading the packed dataset at `source` (its manifest already loaded)."""
    image = manifest.kind == "image"
    batch = options.batch(image)
    workers = usable_cores() if options.workers is None else options.workers
    lanes = max(1, min(workers, usable_cores()))  # one copy per worker; workers beyond the cores add nothing
    seconds = options.seconds
    file_bytes_per_item = manifest.num_bytes / (manifest.num_samples if image else max(int(manifest.lengths.sum()), 1))

    results: list[StageResult] = [_raw_read(source, manifest, options, file_bytes_per_item)]
    how = "cold page cache" if storage.is_local(source) else "fresh download each pass"
    try:
        read = time_stage(Stage("read", _read_step(source, manifest, options, image), note=how), seconds)
    except ImportError as exc:  # the dataloader package missing or broken: the other stages still run
        read = unavailable("read", f"ImportError: {exc}")
    if read.rate is not None and results[0].rate:
        read = replace(read, note=f"{read.note}; {read.rate / results[0].rate:.0%} of raw read")
    results.append(read)
    samples = _buffer_samples(source, manifest, options)
    if image:
        results += _image_stages(samples, options, batch, lanes)
    else:
        note = f"x {lanes} workers" if lanes > 1 else ""
        try:
            results.append(time_stage(Stage("collate", _pad_step(samples, batch), lanes, note), seconds))
        except ImportError as exc:
            results.append(unavailable("collate", f"ImportError: {exc}"))
    results.append(_h2d(samples, image, options, batch))
    epoch_batches = -(-manifest.num_samples // batch)
    results.append(_loader(source, options, image, batch, workers, epoch_batches))
    return results
