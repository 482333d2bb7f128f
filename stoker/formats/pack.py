"""`pack-dataset`: turn an image tree or text files into shards plus a manifest; parallel, resumable, atomic.

How it stays safe and resumable:
  * The input is listed in sorted order and cut into shards by a deterministic plan (bytes per shard).
  * Each worker writes one whole shard under a hidden temporary name; the driver's threads fsync it, rename it
    into place, then record it in `DST/.stoker-pack/<shard>.json`. A shard without that record is redone on the
    next run. Workers are threads for images and processes for text (see `_writers`).
  * The manifest is written last, atomically; then the `.stoker-pack` folder is removed. A rerun of the
    same command after a crash finishes only what is missing; the result is byte-identical.
  * `--engine ray` runs the very same shard jobs as Ray tasks instead of on local workers
    (stoker.formats.ray_engine); SRC and DST may be fsspec URLs (SRC is listed by stoker.formats.listing).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from stoker import storage
from stoker.errors import ConfigError, SourceError
from stoker.formats import arrow_shard, msgpack_shard  # noqa: F401 - the writers, imported once before workers fork
from stoker.formats.sources import images, text
from stoker.formats.manifest import MANIFEST_NAME, Manifest, ShardInfo
from stoker.formats.schema import FORMAT_VERSION, describe, schema_for, token_dtype
from stoker.formats.shard import SUFFIX, create_writer, format_names

STATE_DIR = ".stoker-pack"


@dataclass(frozen=True)
class PackOptions:
    """Everything `pack-dataset` can be told, besides SRC and DST."""

    format: str = "arrow"
    shard_size: int = 256 << 20
    workers: int | None = None  # parallel shards (threads for images, processes for text); None = all cores
    max_side: int | None = None
    quality: int = 90
    on_error: str = "raise"  # or "skip"
    overwrite: bool = False
    validate: str = "header"  # "none" | "header" (complete file, valid header) | "decode" (reduced-size decode)
    kind: str | None = None  # "image" | "text" | None (detect)
    text_field: str = "text"
    tokenizer: str = "bytes"
    vocab_size: int | None = None
    batch_bytes: int = 4 << 20
    part: tuple[int, int] | None = None  # (index, count): pack only this deterministic slice, see stoker.formats.merge
    files_from: str | None = None  # a text file listing SRC-relative image paths, instead of walking SRC
    progress: bool = True
    engine: str = "local"  # "local" (workers on this machine) or "ray" (one Ray task per shard, see stoker.formats.ray_engine)
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or ray://host:port: join a cluster
    max_retries: int = 3  # Ray only: reruns of a shard task whose worker died or hit an I/O error
    storage_options: dict[str, Any] | None = field(default=None, compare=False)  # for DST (and SRC on the same store)
    source_options: dict[str, Any] | None = field(default=None, compare=False)  # for SRC when it needs its own

    def __post_init__(self) -> None:
        # Checked when built, named as PackOptions/pack_dataset spell them (the CLI's flags map onto these names).
        if self.format not in format_names():
            raise ConfigError(f"format={self.format!r}: expected one of {', '.join(format_names())}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={self.on_error!r}: expected 'raise' or 'skip'")
        if self.shard_size < 1 << 10:
            raise ConfigError(f"shard_size={self.shard_size}: too small; use at least 1KB (256MB is typical)")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"max_side={self.max_side}: use at least 8 pixels")
        if self.kind not in (None, "image", "text"):
            raise ConfigError(f"kind={self.kind!r}: expected 'image' or 'text'")
        if self.validate not in images.VALIDATE_LEVELS:
            raise ConfigError(f"validate={self.validate!r}: expected one of {', '.join(images.VALIDATE_LEVELS)}")
        if self.part is not None and not (self.part[1] >= 1 and 0 <= self.part[0] < self.part[1]):
            raise ConfigError(f"part={self.part}: expected (I, N) with 0 <= I < N")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers={self.workers}: need at least 1")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine={self.engine!r}: expected 'local' or 'ray'")
        if self.ray_address and self.engine != "ray":
            raise ConfigError(f"ray_address={self.ray_address!r}: only used with engine='ray'")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries}: expected 0 or more")


@dataclass(frozen=True)
class PackResult:
    """What a pack run produced and how fast."""

    manifest: Manifest
    seconds: float
    samples: int
    bytes_in: int
    bytes_out: int
    skipped: int
    reused_shards: int


@dataclass(frozen=True)
class PackJob:
    """One shard's work, sent to a worker (a local one, or a Ray task: `ray_engine.run_jobs`)."""

    index: int
    name: str
    fingerprint: str
    kind: str
    src: str
    dst: str
    stage_dir: str
    units: tuple[Any, ...]  # ImageItem or TextSpan
    options: PackOptions
    dtype: str | None


@dataclass(frozen=True)
class Layout:
    """File names of one pack run: the whole dataset, or part I of N (whose names never collide)."""

    prefix: str
    manifest: str
    state_dir: str

    @classmethod
    def of(cls, part: tuple[int, int] | None) -> Layout:
        if part is None:
            return cls("shard-", MANIFEST_NAME, STATE_DIR)
        tag = f"part-{part[0]:05d}-of-{part[1]:05d}"
        return cls(f"{tag}-shard-", f"manifest.{tag}.json", f"{STATE_DIR}-{tag}")


def detect_kind(src: str, storage_options: dict[str, Any] | None = None) -> str:
    """'text' for a text file or a folder of text files, else 'image'."""
    if not storage.is_local(src):
        from stoker.formats import listing

        fs, path = storage.filesystem(src, storage_options)
        if fs.isfile(path):
            return "text"
        prefixes, files = listing.list_prefixes(src, storage_options)
        return "text" if not prefixes and any(f.key.lower().endswith(text.TEXT_SUFFIXES) for f in files) else "image"
    if os.path.isfile(src):
        return "text"
    if os.path.isdir(src):
        entries = [e for e in os.scandir(src) if not e.name.startswith(".")]
        if entries and not any(e.is_dir() for e in entries) and any(e.name.lower().endswith(text.TEXT_SUFFIXES) for e in entries):
            return "text"
    return "image"


def _plan_images(src: str, opts: PackOptions) -> tuple[list[str], list[tuple[Any, ...]], list[dict[str, str]]]:
    from stoker.formats import listing

    files, sizes = None, None
    if opts.files_from is not None:
        entries = listing.read_file_list(opts.files_from, opts.source_options)
        files = [key for key, _ in entries]
        sizes = {key: size for key, size in entries if size is not None}
    classes, items, skipped = images.list_image_tree(
        src, skip_errors=opts.on_error == "skip", files=files, sizes=sizes, storage_options=opts.source_options
    )
    shards: list[tuple[Any, ...]] = []
    current: list[images.ImageItem] = []
    size = 0
    for item in items:
        if current and size + item.size > opts.shard_size:
            shards.append(tuple(current))
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        shards.append(tuple(current))
    return classes, shards, skipped


def _plan_text(src: str, opts: PackOptions, dtype: np.dtype) -> tuple[list[tuple[Any, ...]], list[dict[str, str]]]:
    # Byte-level tokens take `itemsize` bytes per input byte; other tokenizers compress, so this errs small.
    target = max(1, opts.shard_size // dtype.itemsize)
    so = opts.source_options
    files, skipped = text.text_name_problems(src, text.list_text_files(src, so))
    if skipped and opts.on_error == "raise":
        lines = "\n".join(f"  {s['path']}: {s['error']}" for s in skipped)
        raise SourceError(f"{src}: {len(skipped)} unusable file name(s); fix them or pass on_error='skip':\n{lines}")
    spans = [span for path in files for span in text.text_spans(path, target, so)]
    shards: list[tuple[Any, ...]] = []
    current: list[text.TextSpan] = []
    size = 0
    for span in spans:
        span_bytes = span.byte_stop - span.byte_start
        if current and size + span_bytes > target:
            shards.append(tuple(current))
            current, size = [], 0
        current.append(span)
        size += span_bytes
    if current:
        shards.append(tuple(current))
    return shards, skipped


def _fingerprints(kind: str, shards: list[tuple[Any, ...]], opts: PackOptions) -> list[str]:
    """One hash per shard of everything that decides its bytes; a finished shard is reused only on a match.

    Units are flat frozen dataclasses, so vars() is asdict() without its deep copy (a tenth of the time).
    """
    relevant = asdict(opts)
    for volatile in ("workers", "progress", "overwrite", "storage_options", "source_options", "engine", "ray_address", "max_retries"):
        relevant.pop(volatile)
    # The format version too: a shard written by a stoker of another format (no checksums) is not reused.
    common = json.dumps({"kind": kind, "options": relevant, "format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    return [
        hashlib.sha256((common + json.dumps([vars(u) for u in units], sort_keys=True)).encode()).hexdigest()
        for units in shards
    ]


# ---- worker side -------------------------------------------------------------------------------------------

_progress: Any = None  # (samples, bytes) shared counters, set per worker by the pool initializer
_unreported = threading.local()  # per worker thread: [samples, bytes] counted, not yet added to the counters


def _init_worker(counters: Any) -> None:
    global _progress
    _progress = counters
    _unreported.counts = [0, 0]


def _count(samples: int, nbytes: int, *, flush: bool = False) -> None:
    # The shared counters take a lock; the bar redraws every 0.25 s, so adding per 64 samples loses nothing.
    counts = getattr(_unreported, "counts", None)
    if counts is None:
        counts = _unreported.counts = [0, 0]
    counts[0] += samples
    counts[1] += nbytes
    if _progress is not None and (flush or counts[0] >= 64):
        with _progress[0].get_lock():
            _progress[0].value += counts[0]
            _progress[1].value += counts[1]
        counts[0] = counts[1] = 0


def _samples(job: PackJob, tokenize: Any, vocab_size: int | None, skipped: list[dict[str, str]]):
    """Yield the samples of one shard; bad inputs raise or are recorded in `skipped`."""
    opts = job.options
    if job.kind == "image":
        failed: list[str] = []  # with --on-error raise: every bad file of the shard is named, then it fails
        for item in job.units:
            try:
                yield images.load_image(job.src, item, max_side=opts.max_side, quality=opts.quality, validate=opts.validate,
                                         storage_options=opts.source_options)
            except (SourceError, FileNotFoundError) as exc:
                if opts.on_error == "raise":
                    failed.append(str(exc))
                else:
                    skipped.append({"path": item.key, "error": _relative(str(exc), job.src, item.key)})
            _count(1, item.size)
        if len(failed) == 1:
            raise SourceError(f"{failed[0]}; fix it or pass on_error='skip'")
        if failed:
            raise SourceError(f"{len(failed)} unreadable files; fix them or pass on_error='skip':\n  " + "\n  ".join(failed))
        return
    dtype = np.dtype(job.dtype)
    for span in job.units:
        name = text.text_key(job.src, span.path)
        for number, document in text.read_documents(span, opts.text_field, opts.source_options):
            where = f"{storage.redact(span.path)}:{number}"
            try:
                tokens = text.to_tokens(where, document, tokenize, vocab_size, dtype)
            except SourceError as exc:
                if opts.on_error == "raise":
                    raise
                skipped.append({"path": f"{name}:{number}", "error": str(exc).removeprefix(f"{where}: ")})
                continue
            yield {"key": f"{name}:{number}", "tokens": tokens, "length": len(tokens)}
            _count(1, 0)
        _count(0, span.byte_stop - span.byte_start)


def _relative(message: str, src: str, key: str) -> str:
    """A problem as the manifest's `skipped` list records it: the path is in its own field, relative to SRC."""
    for path in (os.path.join(src, key), storage.join(src, key), storage.redact(storage.join(src, key))):
        if message.startswith(path + ": "):
            return message[len(path) + 2:]
    return message


@dataclass(frozen=True)
class _Written:
    """A shard written under its temporary name, not yet durable nor visible."""

    tmp: str
    info: ShardInfo
    skipped: list[dict[str, str]]


def _write_shard(job: PackJob) -> _Written:
    """Write one shard's samples under a temporary name (no fsync: _publish_shard does it)."""
    tokenize, vocab_size = text.make_tokenizer(job.options.tokenizer) if job.kind == "text" else (None, None)
    if job.kind == "text" and job.options.vocab_size is not None:
        vocab_size = job.options.vocab_size
    schema = schema_for(job.kind, np.dtype(job.dtype) if job.dtype else None)
    tmp = os.path.join(job.stage_dir, storage.temp_name(job.name))
    writer = create_writer(job.options.format, tmp, schema, batch_bytes=job.options.batch_bytes)
    skipped: list[dict[str, str]] = []
    lengths: list[int] = []
    try:
        for sample in _samples(job, tokenize, vocab_size, skipped):
            writer.add(sample)
            if job.kind == "text":
                lengths.append(sample["length"])
        rows, nbytes, digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        _count(0, 0, flush=True)
    info = ShardInfo(job.name, rows, nbytes, digest, np.asarray(lengths, np.uint32) if job.kind == "text" else None)
    return _Written(tmp, info, skipped)


def _publish_shard(job: PackJob, written: _Written) -> dict[str, Any]:
    """Make a written shard durable and visible under its name, then record it; return the record."""
    if written.info.rows:
        storage.publish_local(written.tmp, storage.join(job.dst, job.name), job.options.storage_options)
    else:
        os.remove(written.tmp)
    record = {"fingerprint": job.fingerprint, "shard": written.info.to_json(), "skipped": written.skipped}
    state = storage.join(storage.join(job.dst, Layout.of(job.options.part).state_dir), job.name + ".json")
    storage.write_bytes_atomic(state, json.dumps(record).encode(), job.options.storage_options)
    return record


def pack_shard(job: PackJob) -> dict[str, Any]:
    """Write one shard under a temporary name, publish it, record it; return its record (manifest entry inside)."""
    return _publish_shard(job, _write_shard(job))


# ---- driver ------------------------------------------------------------------------------------------------


def _read_json(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _prepare_dst(dst: str, fingerprint: str, opts: PackOptions, layout: Layout) -> Manifest | None:
    """Create DST, refuse to replace a different finished dataset, clear leftovers; return it if already done."""
    so = opts.storage_options
    fs, path = storage.filesystem(dst, so)
    # s3fs answers exists/ls/cat from listings it cached earlier in this process; other parts write here too.
    fs.invalidate_cache(path)
    fs.makedirs(path, exist_ok=True)
    manifest_url = storage.join(dst, layout.manifest)
    if opts.overwrite:
        # Only this run's own files: other parts of a partitioned pack may be writing beside it.
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            ours = name.startswith(layout.prefix) or name.lstrip(".").startswith(layout.prefix)
            if name in (layout.manifest, layout.state_dir) or ours or (layout.manifest == MANIFEST_NAME and name.startswith("manifest.part-")):
                fs.rm(entry, recursive=True)
    elif fs.exists(storage.filesystem(manifest_url, so)[1]):
        existing = Manifest.load(manifest_url, so)
        if existing.options.get("fingerprint") == fingerprint:
            return existing
        raise ConfigError(f"{storage.redact(dst)} already holds a different packed dataset; pass overwrite=True to replace it")
    fs.makedirs(storage.filesystem(storage.join(dst, layout.state_dir), so)[1], exist_ok=True)
    _remove_temp_files(dst, layout)
    return None


def _remove_temp_files(dst: str, layout: Layout) -> None:
    """Delete this run's hidden temporary shards in a local DST, left by killed workers or retried Ray tasks."""
    if storage.is_local(dst):  # remote stores never show partial objects
        for entry in os.scandir(storage.local_path(dst)):
            if storage.is_temp_name(entry.name) and entry.name[1:].startswith(layout.prefix):
                try:
                    os.remove(entry.path)
                except FileNotFoundError:  # another part's cleanup got there first
                    pass


def _resolve_source(src: str, dst: str, opts: PackOptions) -> tuple[str, PackOptions]:
    """SRC as an absolute path or a URL, checked to exist; SRC's storage options settled once for all workers."""
    if storage.is_local(src):
        src = os.path.abspath(storage.local_path(src))
        if not os.path.exists(src):
            raise SourceError(f"{src}: no such file or directory")
        return src, replace(opts, source_options=None)
    so = opts.source_options
    if so is None and src.split("://", 1)[0] == dst.split("://", 1)[0]:
        so = opts.storage_options  # the same store (one set of credentials) is the common case
    fs, path = storage.filesystem(src, so)
    if not fs.exists(path):
        raise SourceError(f"{storage.redact(src)}: no such file or prefix")
    return src.rstrip("/"), replace(opts, source_options=so)


def _check_apart(src: str, dst: str) -> None:
    """Refuse a local DST inside SRC: its shards and manifest would be listed as input by the next run."""
    if storage.is_local(src) and storage.is_local(dst) and os.path.isdir(src):
        inner, outer = os.path.realpath(storage.local_path(dst)), os.path.realpath(src)
        if inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep):
            raise ConfigError(f"DST {dst} is inside SRC {src}: the next run would list its shards and manifest as "
                              "input; choose a DST outside SRC")


def pack_dataset(src: str, dst: str, options: PackOptions | None = None, **overrides: Any) -> PackResult:
    """Pack the image tree or text files at `src` into shards and a manifest at `dst` (a path or fsspec URL)."""
    opts = options or PackOptions()
    if overrides:
        opts = PackOptions(**{**asdict(opts), **overrides})
    if opts.engine == "ray":
        from stoker.formats import ray_engine

        ray_engine.import_ray()  # a missing extra fails before any listing or writing
    start = time.perf_counter()
    src, opts = _resolve_source(src, dst, opts)
    _check_apart(src, dst)
    if "memory" in (src.split("://", 1)[0], dst.split("://", 1)[0]):
        # memory:// lives in this process only: other processes would write shards this one never sees.
        if opts.engine == "ray":
            raise ConfigError("engine='ray' cannot use memory:// SRC or DST (each process has its own); use a path or s3://")
        opts = replace(opts, workers=1)
    kind = opts.kind or detect_kind(src, opts.source_options)
    classes: list[str] = []
    skipped: list[dict[str, str]] = []
    dtype: np.dtype | None = None
    if kind == "image":
        classes, plan, skipped = _plan_images(src, opts)
    else:
        _, vocab = text.make_tokenizer(opts.tokenizer)
        dtype = token_dtype(opts.vocab_size if opts.vocab_size is not None else vocab)
        plan, skipped = _plan_text(src, opts, dtype)
    first = 0
    if opts.part is not None:
        # Parts cut the one global plan, so N parts hold exactly the shards of a single run, renamed.
        index, count = opts.part
        first, last = index * len(plan) // count, (index + 1) * len(plan) // count
        plan = plan[first:last]
        skipped = skipped if index == 0 else []
    layout = Layout.of(opts.part)
    shard_prints = _fingerprints(kind, plan, opts)
    # Everything the manifest records, not only the shards: an empty part (no shards) must not match the empty part
    # of another input, or a rerun after SRC changed would keep a stale part manifest (classes, skipped files).
    what = json.dumps({"kind": kind, "classes": classes, "skipped": skipped, "format": opts.format,
                       "part": opts.part, "format_version": FORMAT_VERSION}, sort_keys=True)
    fingerprint = hashlib.sha256((what + "".join(shard_prints)).encode()).hexdigest()
    done = _prepare_dst(dst, fingerprint, opts, layout)
    if done is not None:
        return PackResult(done, time.perf_counter() - start, 0, 0, 0, len(done.skipped), len(done.shards))

    names = [f"{layout.prefix}{first + i:05d}{SUFFIX[opts.format]}" for i in range(len(plan))]
    records: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(names):
        record = _read_json(storage.join(storage.join(dst, layout.state_dir), name + ".json"), opts.storage_options)
        if record is not None and record.get("fingerprint") == shard_prints[i] and _shard_intact(dst, record, opts):
            records[i] = record
    reused = len(records)
    stage = dst if storage.is_local(dst) else tempfile.mkdtemp(prefix="stoker-pack-")
    jobs = [
        PackJob(i, names[i], shard_prints[i], kind, src, dst, storage.local_path(stage), plan[i], opts, dtype.str if dtype is not None else None)
        for i in range(len(plan))
        if i not in records
    ]
    total = sum(len(u) for u in plan) if kind == "image" else None
    try:
        if opts.engine == "ray" and jobs:
            from stoker.formats import ray_engine

            records.update(ray_engine.run_jobs(jobs, opts, total, pack_shard))
        else:
            records.update(_run_jobs(jobs, opts, total))
    finally:
        if stage != dst:
            shutil.rmtree(stage, ignore_errors=True)
    _remove_temp_files(dst, layout)

    shards = [ShardInfo.from_json(records[i]["shard"]) for i in range(len(plan))]
    skipped += [s for i in range(len(plan)) for s in records[i]["skipped"]]
    manifest = Manifest(
        kind=kind,
        format=opts.format,
        schema=describe(schema_for(kind, dtype)),
        shards=tuple(s for s in shards if s.rows),
        classes=tuple(classes),
        vocab_size=(opts.vocab_size or text.make_tokenizer(opts.tokenizer)[1]) if kind == "text" else None,
        token_dtype=dtype.name if dtype is not None else None,
        tokenizer=opts.tokenizer if kind == "text" else None,
        skipped=tuple(skipped),
        options={"fingerprint": fingerprint, "shard_size": opts.shard_size, "max_side": opts.max_side,
                 "part": list(opts.part) if opts.part else None},
    )
    manifest.save(dst, opts.storage_options, name=layout.manifest)
    fs, path = storage.filesystem(storage.join(dst, layout.state_dir), opts.storage_options)
    fs.rm(path, recursive=True)
    bytes_in = sum(u.size for units in plan for u in units) if kind == "image" else sum(
        u.byte_stop - u.byte_start for units in plan for u in units
    )
    return PackResult(
        manifest, time.perf_counter() - start, manifest.num_samples, bytes_in, manifest.num_bytes, len(skipped), reused
    )


def _shard_intact(dst: str, record: dict[str, Any], opts: PackOptions) -> bool:
    info = record["shard"]
    if not info["rows"]:
        return True
    fs, path = storage.filesystem(storage.join(dst, info["name"]), opts.storage_options)
    try:
        return fs.size(path) == info["bytes"]
    except FileNotFoundError:
        return False


def _writers(kind: str, workers: int, ctx: Any, counters: Any) -> cf.Executor:
    """Threads for images, processes for text: the rule is whether the work holds the GIL.

    An image shard is reading files, hashing and writing (all release the GIL) plus ~20 us of Python per image;
    a forked worker cost 30-70 ms to start beside a loaded torch, more than a thread ever waits for the GIL on
    the machines measured (benchmarks/peers.py). Tokenizing text is Python through and through: processes.
    """
    if kind == "image":
        return cf.ThreadPoolExecutor(workers, thread_name_prefix="stoker-pack", initializer=_init_worker, initargs=(counters,))
    # fork starts workers without re-importing anything; they are forked at the first submit, before this process
    # starts any thread of its own (the publishers start later).
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counters,))


def _run_jobs(jobs: list[PackJob], opts: PackOptions, total: int | None) -> dict[int, dict[str, Any]]:
    """Run shard jobs on a worker pool (or inline for one worker), with a progress bar."""
    from tqdm import tqdm

    workers = min(opts.workers or os.cpu_count() or 1, max(1, len(jobs)))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    results: dict[int, dict[str, Any]] = {}
    published: set[cf.Future[dict[str, Any]]] = set()
    bar = tqdm(total=total, unit="sample", disable=not opts.progress or not jobs, dynamic_ncols=True)
    start = time.perf_counter()

    def refresh() -> None:
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.n = counters[0].value
        bar.set_postfix_str(f"{counters[1].value / elapsed / 1e6:.1f} MB/s, {len(results)}/{len(jobs)} shards", refresh=False)
        bar.refresh()

    try:
        if workers == 1:
            _init_worker(counters)
            try:
                for job in jobs:
                    results[job.index] = pack_shard(job)
                    refresh()
            finally:
                _init_worker(None)
            return results
        # Workers only write; this process's threads wait for each shard's fsync and publish it, so a worker
        # packs its next shard while the disk takes the last one instead of sitting idle in fsync.
        pool = _writers(jobs[0].kind, workers, ctx, counters)
        publishers = cf.ThreadPoolExecutor(workers, thread_name_prefix="stoker-publish")
        pending = {pool.submit(_write_shard, job): job for job in jobs}
        try:
            while pending:
                finished, _ = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    if future in published:
                        results[job.index] = future.result()
                    else:
                        publish = publishers.submit(_publish_shard, job, future.result())
                        published.add(publish)
                        pending[publish] = job
                refresh()
        except BaseException:
            for future in pending:
                future.cancel()
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            publishers.shutdown()
            _init_worker(None)  # this process's own counters, when the workers were its threads
        # Every shard is published and the workers are idle: let them exit on their own. Tearing down a forked
        # copy of a process that imported torch takes ~15 ms that nothing here needs to wait for.
        pool.shutdown(wait=False)
        return results
    finally:
        refresh()
        bar.close()
