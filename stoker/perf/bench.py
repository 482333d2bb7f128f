"""`stoker bench`: time each input stage on this machine's own data, then judge whether the pipeline feeds the GPUs.

Each stage runs alone for a bounded time (`seconds`), so a slow stage cannot hide behind a fast one:

    raw read   plain sequential read of the shard files, page cache dropped first: the storage speed of light
    read       stoker reading the same shards into sample dicts (also cold)
    decode     reduced-size JPEG decode, as the Pillow backend does it       } timed per core, then multiplied by
    augment    crop, resize, flip and jitter of decoded images               } the number of loader workers,
    collate    stacking samples into one batch (padding, for text)           } which each run a copy of them
    h2d        pinned host-to-device copy of a batch (only with a CUDA GPU)
    loader     the real loader end to end, with its workers

The stage rates then go to `stoker.perf.verdict.judge_pipeline`. Stages assume they overlap (pipelined), so the
pipeline delivers its slowest stage's rate.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from stoker import storage
from stoker.errors import ConfigError, MissingExtraError
from stoker.perf.reference import consumption_rate, stage_limits
from stoker.perf.verdict import Verdict, format_table, judge_pipeline

DEFAULT_SECONDS = 3.0
_CHUNK = 8 << 20  # raw reads: large sequential requests, as `dd bs=8M` would do
_BUFFERED_SAMPLES = 512  # samples held in memory for the CPU stages, so they never touch storage
_PREFETCH = 2  # batches each loader worker prepares ahead (torch's default)


@dataclass(frozen=True)
class Stage:
    """One stage to time: `step()` does one unit of work and returns (items, bytes) it processed.

    `lanes` is how many copies run in parallel in the real pipeline (one per loader worker); the measured rate of
    one copy is multiplied by it.
    """

    name: str
    step: Callable[[], tuple[int, int]]
    lanes: int = 1
    note: str = ""


@dataclass(frozen=True)
class StageResult:
    """What one stage sustained; `rate` is None when the stage could not be measured (see `note`)."""

    name: str
    rate: float | None  # items/s with all lanes
    per_lane: float | None  # items/s of one lane (one core)
    lanes: int = 1
    bytes_per_s: float | None = None
    items: int = 0
    seconds: float = 0.0
    note: str = ""
    reference: bool = False  # a speed-of-light figure shown for comparison, not a stage of the pipeline

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate, "per_lane": self.per_lane, "lanes": self.lanes,
                "mb_per_s": None if self.bytes_per_s is None else self.bytes_per_s / 1e6, "items": self.items,
                "seconds": self.seconds, "note": self.note, "reference": self.reference,
                "available": self.rate is not None}


def unavailable(name: str, reason: str) -> StageResult:
    """A stage that could not be measured, with the reason shown in its place."""
    return StageResult(name, None, None, note=f"unavailable: {reason}")


@dataclass(frozen=True)
class Consumption:
    """How fast one GPU eats input, and for how many GPUs the pipeline must keep up."""

    rate: float  # items/s per GPU
    unit: str
    num_gpus: int
    source: str  # where the figure comes from: a measured step or a published reference


@dataclass(frozen=True)
class BenchReport:
    """Every stage measurement of one run, the verdict (when a consumption rate was given) and the machine."""

    source: str
    kind: str
    unit: str
    stages: tuple[StageResult, ...]
    consumption: Consumption | None = None
    verdict: Verdict | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what `stoker bench --json` prints)."""
        verdict = None
        if self.verdict is not None:
            v = self.verdict
            verdict = {"keeps_up": v.keeps_up, "bottleneck": v.bottleneck, "bottleneck_kind": v.bottleneck_kind,
                       "pipeline_rate": v.pipeline_rate, "required_rate": v.required_rate,
                       "gpus_feedable": v.gpus_feedable, "advice": list(v.advice)}
        consumption = None if self.consumption is None else vars(self.consumption)
        return {"source": self.source, "kind": self.kind, "unit": self.unit, "settings": self.settings,
                "machine": self.machine, "stages": [s.to_dict() for s in self.stages],
                "consumption": consumption, "verdict": verdict}


# ---- timing ----


def time_stage(stage: Stage, seconds: float) -> StageResult:
    """Call `stage.step()` until `seconds` have passed (at least once) and return the rate it sustained."""
    items = nbytes = 0
    start = time.perf_counter()
    elapsed = 0.0
    try:
        while elapsed < seconds or items == 0:
            done, size = stage.step()
            items, nbytes = items + done, nbytes + size
            elapsed = time.perf_counter() - start
            if elapsed > 10 * seconds + 30:  # a stage that yields nothing must not hang the bench
                break
    except Exception as exc:  # noqa: BLE001 - each stage reports its own failure; the others still run
        return unavailable(stage.name, f"{type(exc).__name__}: {exc}")
    per_lane = items / max(elapsed, 1e-9)
    return StageResult(stage.name, per_lane * stage.lanes, per_lane, stage.lanes,
                       nbytes / max(elapsed, 1e-9) * stage.lanes if nbytes else None, items, elapsed, stage.note)


def judge(stages: Sequence[StageResult], consumption: Consumption, unit: str) -> Verdict:
    """Run `judge_pipeline` over the measured stages (unavailable ones and speed-of-light rows left out)."""
    rates = {s.name: s.rate for s in stages if s.rate is not None and not s.reference}
    if not rates:
        raise ConfigError("no stage could be measured, so there is nothing to judge; see the notes of each stage")
    if consumption.unit != unit:
        raise ConfigError(f"the consumption rate is in {consumption.unit} but the stages are measured in {unit}")
    return judge_pipeline(rates, consumption.rate, consumption.num_gpus, unit=unit)


def bench_pipeline(stages: Sequence[Stage], seconds: float = DEFAULT_SECONDS, *,
                   consumption: Consumption | None = None, unit: str = "items/s") -> BenchReport:
    """Time arbitrary stages one after another and judge them; the core of `bench_dataset`, usable on its own."""
    results = tuple(time_stage(stage, seconds) for stage in stages)
    verdict = judge(results, consumption, unit) if consumption is not None else None
    return BenchReport("custom", "custom", unit, results, consumption, verdict, {"seconds": seconds}, machine_info())


# ---- consumption ----


def resolve_consumption(*, step_time: float | None = None, items_per_step: float | None = None,
                        model: str | None = None, gpu: str | None = None, num_gpus: int = 1,
                        unit: str = "img/s") -> Consumption | None:
    """The consumption rate from a measured step (`step_time`, `items_per_step`) or the reference table; or None."""
    if num_gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {num_gpus}")
    if step_time is not None and model is not None:
        raise ConfigError("give either a measured step (--step-time, --batch-size) or a reference (--model, --gpu)")
    if step_time is not None:
        if not step_time > 0 or not items_per_step or items_per_step <= 0:
            raise ConfigError(f"need a positive --step-time and batch size, got {step_time} s and {items_per_step}")
        what = unit.split("/")[0]
        return Consumption(items_per_step / step_time, unit, num_gpus,
                           f"measured step: {items_per_step:,.0f} {what} in {step_time:g} s")
    if model is not None or gpu is not None:
        if model is None or gpu is None:
            raise ConfigError("--model and --gpu go together, e.g. --model resnet50 --gpu h100")
        ref = consumption_rate(model, gpu)
        if ref.unit != unit:
            raise ConfigError(f"{model} on {gpu} is rated in {ref.unit}, but this dataset is measured in {unit}")
        return Consumption(ref.rate, ref.unit, num_gpus, f"{ref.workload} [{ref.source}]")
    return None


# ---- the stages of a packed dataset ----


@dataclass(frozen=True)
class BenchOptions:
    """How `bench_dataset` measures: time per stage, loader shape and the image transform."""

    seconds: float = DEFAULT_SECONDS
    batch_size: int | None = None  # None: 64 images or 32 text samples
    workers: int | None = None  # loader workers; None: the cores this process may use
    size: int = 224  # output side of the image transform
    storage_options: dict[str, Any] | None = None

    def check(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"--seconds must be positive, got {self.seconds}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bench_dataset(source: str, options: BenchOptions | None = None, *,
                  consumption: Consumption | None = None) -> BenchReport:
    """Measure every stage of loading the packed dataset at `source` (directory or URL) and judge the result."""
    from stoker.formats.manifest import Manifest

    options = options or BenchOptions()
    options.check()
    manifest = Manifest.load(source, options.storage_options)
    if not manifest.num_samples:
        raise ConfigError(f"{storage.redact(source)} holds no samples; nothing to measure")
    image = manifest.kind == "image"
    unit = "img/s" if image else "tokens/s"
    batch = options.batch_size or (64 if image else 32)
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
    results.append(_loader(source, options, image, batch, workers))
    verdict = judge(results, consumption, unit) if consumption is not None else None
    settings = {"seconds": seconds, "batch_size": batch, "workers": workers, "transform": f"pil, {options.size} px"
                if image else "pad_collate", "samples": manifest.num_samples,
                "shards": len(manifest.shards), "bytes": manifest.num_bytes, "format": manifest.format}
    return BenchReport(storage.redact(source), manifest.kind, unit, tuple(results), consumption, verdict, settings,
                       machine_info())


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
    """decode, augment and collate for images: timed piece by piece inside one loop over in-memory batches."""
    import torch

    names = ("decode", "augment", "collate")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "per core" means one core: a loader worker also runs torch on one thread
    try:
        timer = _time_pil_pieces(samples, options, batch)
    except Exception as exc:  # noqa: BLE001 - e.g. the augment package missing or changed; say so per stage
        return [unavailable(name, f"{type(exc).__name__}: {exc}") for name in names]
    finally:
        torch.set_num_threads(threads)
    times, rates = timer.times(), timer.rates()
    out = []
    for name in names:
        note = f"x {lanes} workers" if lanes > 1 else ""
        limits = stage_limits("decode") if name == "decode" else ()
        if limits:
            note += f"{'; ' if note else ''}published: {limits[0].low:,.0f}-{limits[0].high:,.0f} img/s per core"
        out.append(StageResult(name, rates[name] * lanes, rates[name], lanes, None,
                               round(rates[name] * times[name]), times[name], note))
    return out


def _time_pil_pieces(samples: list[dict[str, Any]], options: BenchOptions, batch: int) -> Any:
    """Decode, augment and collate as the Pillow backend does them, each piece timed on its own."""
    import numpy as np
    import torch
    from PIL import Image

    from stoker.augment.decode import decode_for_box, probe
    from stoker.augment.params import sample_params, sample_rng
    from stoker.augment.pil import jitter, resample
    from stoker.augment.spec import TransformSpec
    from stoker.perf.stats import StageTimer

    spec = TransformSpec(size=options.size)
    out_size = (spec.width, spec.height)
    timer = StageTimer()
    deadline = time.perf_counter() + options.seconds
    for epoch, group in enumerate(_batches(samples, batch)):
        pixels = []
        for sample in group:
            with timer.stage("decode"):
                image, header = probe(sample["image"], spec.max_pixels)
                params = sample_params(spec, sample_rng(0, epoch, sample), header.width, header.height)
                image, box = decode_for_box(image, header, params.box, out_size)
            with timer.stage("augment"):
                tensor = resample(image, box, out_size)
                if params.flip:
                    tensor = tensor.flip(-1)
                if params.jitter != (1.0, 1.0, 1.0):
                    shifted = jitter(Image.fromarray(tensor.permute(1, 2, 0).numpy()), params.jitter)
                    tensor = torch.from_numpy(np.array(shifted)).permute(2, 0, 1)
            pixels.append(tensor)
        with timer.stage("collate", items=len(group)):
            torch.stack(pixels)
            torch.tensor([int(s["label"]) for s in group], dtype=torch.int64)
        if time.perf_counter() >= deadline:
            return timer
    raise AssertionError("unreachable")


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


def _loader(source: str, options: BenchOptions, image: bool, batch: int, workers: int) -> StageResult:
    """The real loader end to end: StreamingDataset, shuffled, with `workers` worker processes."""
    try:
        loader, name = _make_loader(source, options, image, batch, workers)
        batches = iter(loader)
        start = time.perf_counter()
        next(batches)  # worker start-up and first shard opening: reported, not part of the rate
        first = time.perf_counter() - start
        # Batches prefetched during start-up would count as free: drain them before the clock starts.
        for _ in range(workers * _PREFETCH):
            got = next(batches, None)
            batches = iter(loader) if got is None else batches
    except Exception as exc:  # noqa: BLE001 - reported in place of the stage
        return unavailable("loader", f"{type(exc).__name__}: {exc}")

    def step() -> tuple[int, int]:
        nonlocal batches
        got = next(batches, None)
        if got is None:  # epoch over: the next pass reuses the persistent workers
            batches = iter(loader)
            return 0, 0
        return (len(got["label"]), 0) if image else (int(got["lengths"].sum()), 0)

    note = f"end to end: {name}, {workers} workers, batch {batch}; first batch after {first:.2f} s"
    try:
        return time_stage(Stage("loader", step, note=note), options.seconds)
    finally:
        del batches, loader  # shuts the worker processes down now, not at interpreter exit


def _make_loader(source: str, options: BenchOptions, image: bool, batch: int, workers: int,
                 prefetch: int = _PREFETCH) -> tuple[Any, str]:
    """(loader, its description)."""
    from stoker.dataloader.stream import StreamingDataset

    try:
        from stoker.dataloader.loader import DataLoader

        name = "stoker.DataLoader"
    except ImportError:  # the stoker loader is optional here; torch's works with a StreamingDataset too
        from torch.utils.data import DataLoader

        name = "torch DataLoader over stoker.StreamingDataset"
    dataset = StreamingDataset(source, shuffle=True, seed=0, storage_options=options.storage_options)
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch} if workers else {}
    if image:
        from stoker.augment.registry import build_transform
        from stoker.augment.spec import TransformSpec

        transform = build_transform(TransformSpec(size=options.size), backend="pil", seed=0)
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=transform, **extra)
    else:
        from stoker.bucketing.collate import pad_collate
        from stoker.bucketing.stream import BucketedStream

        stream = BucketedStream(dataset, batch_size=batch)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pad_collate(), **extra)
        name += " + BucketedStream + pad_collate"
    return loader, name


# ---- output ----


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, Python and torch versions: what a benchmark figure depends on."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": usable_cores(), "ram_gib": None if ram is None else round(ram, 1), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def format_report(report: BenchReport) -> str:
    """The stage table, then the verdict (or how to get one)."""
    s = report.settings
    head = f"stoker bench: {report.source} ({report.kind}"
    if "samples" in s:
        head += f", {s['samples']:,} samples in {s['shards']} {s['format']} shards, {s['bytes'] / 1e6:,.1f} MB"
    head += f"); {s.get('seconds')} s per stage"
    if "workers" in s:
        head += f", {s['workers']} loader workers, batch {s['batch_size']}"
    width = max(len("stage"), *(len(r.name) for r in report.stages))
    lines = [head, f"{'stage':<{width}}  {'rate (' + report.unit + ')':>16}  {'per core':>10}  {'MB/s':>9}  note"]
    for r in report.stages:
        rate = "-" if r.rate is None else f"{r.rate:,.0f}"
        per_core = f"{r.per_lane:,.0f}" if r.per_lane is not None and r.lanes > 1 else "-"
        mbs = "-" if r.bytes_per_s is None else f"{r.bytes_per_s / 1e6:,.1f}"
        lines.append(f"{r.name:<{width}}  {rate:>16}  {per_core:>10}  {mbs:>9}  {r.note}")
    if report.verdict is None:
        lines.append("no consumption rate given: add --step-time SECONDS --batch-size N (a measured training step) "
                     "or --model M --gpu G [--gpus N] for a verdict")
    else:
        c = report.consumption
        lines += ["", f"consumption: {c.rate:,.0f} {c.unit} per GPU ({c.source})", format_table(report.verdict)]
    return "\n".join(lines)


def plot_report(report: BenchReport, path: str) -> None:
    """Save a bar chart of the stage rates against the consumption line(s) to `path` (needs matplotlib)."""
    plt = _pyplot()
    rows = [r for r in report.stages if r.rate is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8))
    names = [r.name + (" (speed of light)" if r.reference else "") for r in rows]
    colours = ["#bbbbbb" if r.reference else "#4477aa" for r in rows]
    if report.verdict is not None:
        colours = ["#cc3311" if r.name == report.verdict.bottleneck else c for r, c in zip(rows, colours)]
    ax.barh(names[::-1], [max(r.rate, 1e-9) for r in rows][::-1], color=colours[::-1])
    ax.set_xscale("log")
    ax.set_xlabel(report.unit)
    if report.consumption is not None and report.verdict is not None:
        c = report.consumption
        ax.axvline(c.rate, color="#228833", linestyle="--", label=f"1 GPU: {c.rate:,.0f}")
        if c.num_gpus > 1:
            ax.axvline(report.verdict.required_rate, color="#228833", label=f"{c.num_gpus} GPUs: "
                       f"{report.verdict.required_rate:,.0f}")
        ax.legend(loc="lower right")
        state = "keeps up" if report.verdict.keeps_up else f"starved by {report.verdict.bottleneck}"
        ax.set_title(f"stoker bench: {state} (feeds {report.verdict.gpus_feedable:.2f} GPUs)")
    else:
        ax.set_title("stoker bench: stage throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot() -> Any:
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError("stoker bench --plot", "plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


# ---- command line ----


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `stoker bench` options to `parser`."""
    parser.add_argument("dataset", help="packed dataset: directory or URL (s3://bucket/prefix)")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="time per stage (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: usable cores)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per batch, also the items of one --step-time step (default 64 images, 32 texts)")
    parser.add_argument("--step-time", type=float, default=None, help="seconds of one measured training step")
    parser.add_argument("--model", default=None, help="reference consumption rate, e.g. resnet50 (with --gpu)")
    parser.add_argument("--gpu", default=None, help="reference GPU, e.g. a100 or h100 (with --model)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs to feed (default 1)")
    parser.add_argument("--size", type=int, default=224, help="image output side (default 224)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="save a chart of stage rates (needs stoker[plot])")
    parser.add_argument("--tune", action="store_true",
                        help="instead of the stage table, sweep num_workers x prefetch_factor on these shards and "
                             "recommend a setting (--seconds per setting, default 2)")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Run `stoker bench` from parsed arguments; prints the table (or JSON) and saves the plot."""
    from stoker.formats.manifest import Manifest

    if args.plot:
        _pyplot()  # fail before minutes of measuring, not after
    options = BenchOptions(seconds=args.seconds, batch_size=args.batch_size, workers=args.workers, size=args.size)
    options.check()
    manifest = Manifest.load(args.dataset)
    image = manifest.kind == "image"
    batch = args.batch_size or (64 if image else 32)
    # For text, a step of `batch` sequences consumes `batch` x the mean sequence length in tokens.
    per_sample = 1.0 if image else float(manifest.lengths.mean()) if manifest.num_samples else 0.0
    consumption = resolve_consumption(step_time=args.step_time, items_per_step=batch * per_sample, model=args.model,
                                      gpu=args.gpu, num_gpus=args.gpus, unit="img/s" if image else "tokens/s")
    if args.tune:
        from stoker.perf.tune import format_sweep, sweep

        seconds = args.seconds if args.seconds != DEFAULT_SECONDS else 2.0
        result = sweep(args.dataset, replace(options, seconds=seconds), consumption=consumption)
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_sweep(result))
        return 0
    report = bench_dataset(args.dataset, options, consumption=consumption)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if args.plot:
        plot_report(report, args.plot)
        if not args.json:
            print(f"plot saved to {args.plot}")
    return 0

