"""Side by side, in one run: stoker against ImageFolder + torch DataLoader, WebDataset, MosaicML Streaming, LitData
and Hugging Face datasets, packing and loading the same JPEGs.

    .venv-bench/bin/python benchmarks/peers.py [--per-class 100] [--workers 2] [--rounds 2] [--only webdataset]

Same for every system: the cached ~450x450 JPEG tree of benchmarks/_data.py, stored as the original bytes (never
re-encoded), ~8 MB shards, `--workers` processes, batches of 64, shuffled, local disk with a warm page cache.
  packing  SRC tree -> the system's own shard format with its own writer (parallel where the library is), then
           os.sync(), so everyone pays for putting the bytes on disk; one untimed warm-up pack of 10 images first.
  loading  a second epoch timed from iter() to its last batch, after a first epoch that starts the (persistent)
           workers; the first batch's latency is reported apart. Twice:
    typical      each system as its documentation shows it: per-sample decode + RandomResizedCrop(224) + flip
                 (torchvision transforms when importable, else the same steps in PIL) and the default collate;
                 stoker with its own batch transform as collate_fn and stoker.DataLoader
    same xform   every system hands encoded samples to stoker's batch transform as collate_fn, so only the
                 storage format and the loader differ
  store    every packed dataset is served by a real object store on 127.0.0.1 (stoker.testing.ObjectStore: nginx
           with `--store-latency-ms` (20) before every first byte and `--store-rate-mb` (100) MB/s per connection, as
           S3 roughly gives; read-only, as a bucket of published data is) and read back as each system's docs say:
           one epoch with an empty cache, timed from building its dataset (index downloads count) to the last batch.
           stoker: s3:// with a path-style endpoint (storage_options as s3fs takes them); WebDataset: plain http
           URLs of the tars (its gopen pipes them through curl); MosaicML Streaming: s3:// with S3_ENDPOINT_URL;
           LitData: s3:// with storage_options for its client (allow_http: the store is not HTTPS); HF datasets:
           load_dataset("arrow", data_files=http URLs of the saved shards), which downloads everything first
           (load_from_disk on s3:// lists the folder, which a read-only store does not serve). `--no-store` skips it.
Every pack and every round of loads runs in a fresh child process (see `run`). A peer that does not import in this
interpreter is listed with the reason, never dropped. Peers need their own venv (docs/bench.md): mosaicml-streaming
imports torchvision, and no torchvision wheel here works with the project's torch 2.13 CPU build.
The machine may be shared: compare ratios from one run; `--rounds` keeps each measurement's best.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import _data

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

import stoker
from stoker.augment.params import random_resized_crop_box

SIZE = 224
CHILD_TIMEOUT_S = 240  # one pack or one round of loads of one system
Item = Callable[[bytes, int, str], Any]  # (encoded image, label, key) -> what the loader's collate receives


@dataclass(frozen=True)
class Config:
    per_class: int
    workers: int
    batch: int
    shard_bytes: int
    rounds: int
    store_latency_ms: int | None = 20  # None: no object-store leg
    store_rate_mb: int = 100  # per connection


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # what must import for the peer to run
    package: str  # what pip installs
    pack: Callable[[Path, Path, Config], None] | None  # None: reads the raw files, nothing to pack
    dataset: Callable[[Path, Path, Config, Item], tuple[Any, Callable[..., Any]]]  # (dataset, loader class)
    remote: Callable[[Store, Path, Config, Item], tuple[Any, Callable[..., Any]]] | None = None
    # ^ the same from the object store (its packed folder, served read-only), caching in the folder given;
    #   None: the system has no reader for object stores


@dataclass(frozen=True)
class Store:
    """One peer's packed folder on the object store, as a child process is told about it."""

    endpoint: str  # http://127.0.0.1:PORT, a path-style S3 endpoint and a plain http server at once
    bucket: str
    prefix: str  # the peer's folder in the bucket
    objects: tuple[str, ...]  # its files, relative to the folder (what a reader that cannot list is given)
    key: str
    secret: str
    region: str

    @property
    def s3_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def http_url(self, name: str) -> str:
        return f"{self.endpoint}/{self.bucket}/{self.prefix}/{name}"

    def s3fs_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}


# ---- what every loader applies to a sample ----


def _typical_item(image: bytes, label: int, key: str) -> tuple[torch.Tensor, int]:
    """Decode + RandomResizedCrop(224) + horizontal flip, per sample, as torchvision users write it."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    return _augment()(picture), label


@functools.cache
def _augment() -> Callable[[Image.Image], torch.Tensor]:
    try:
        from torchvision.transforms import v2

        return v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    except (ImportError, RuntimeError):  # absent, or built for another torch: the same steps in plain PIL
        return _pil_augment


def _pil_augment(picture: Image.Image) -> torch.Tensor:
    box = random_resized_crop_box(random, picture.width, picture.height, (0.08, 1.0), (3 / 4, 4 / 3))
    picture = picture.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)
    if random.random() < 0.5:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


def _encoded_item(image: bytes, label: int, key: str) -> dict[str, Any]:
    """The encoded sample, left for stoker's batch transform (the collate_fn) to decode."""
    return {"image": image, "label": int(label), "key": key}


class Mapped(IterableDataset):
    """Apply `item` to every sample of a peer's iterable dataset (which splits itself among workers)."""

    def __init__(self, inner: Any, item: Callable[[dict[str, Any]], Any]) -> None:
        self.inner, self.item = inner, item

    def __iter__(self):
        return map(self.item, iter(self.inner))


class Indexed(Dataset):
    """Apply `item` to every sample of a map-style source."""

    def __init__(self, size: int, get: Callable[[int], Any], item: Callable[[Any], Any]) -> None:
        self.size, self.get, self.item = size, get, item

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        return self.item(self.get(index))


def _files(src: Path) -> list[tuple[Path, int]]:
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    return [(p, label) for label, d in enumerate(classes) for p in sorted(d.glob("*.jpg"))]


def _tiny_tree(src: Path, dst: Path) -> Path:
    """Two classes of five images: what each system packs once, untimed, before it is timed."""
    for folder in sorted(d for d in src.iterdir() if d.is_dir())[:2]:
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.jpg"))[:5]:
            shutil.copy(path, dst / folder.name / path.name)
    return dst


# ---- the systems ----


def _stoker_pack(src: Path, dst: Path, cfg: Config, validate: str = "header") -> None:
    stoker.pack_dataset(str(src), str(dst), workers=cfg.workers, shard_size=cfg.shard_bytes, overwrite=True,
                        progress=False, validate=validate)


def _stoker_pack_unvalidated(src: Path, dst: Path, cfg: Config) -> None:
    _stoker_pack(src, dst, cfg, validate="none")


def _stoker_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    # Always encoded samples: stoker's documented way is its batch transform as the collate_fn.
    return stoker.StreamingDataset(str(packed), shuffle=True, seed=0, columns=["key", "label", "image"]), stoker.DataLoader


def _stoker_remote(store: Store, cache: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    dataset = stoker.StreamingDataset(store.s3_url, shuffle=True, seed=0, columns=["key", "label", "image"],
                                      storage_options=store.s3fs_options(), cache_dir=str(cache))
    return dataset, stoker.DataLoader


def _sample_fn(item: Item) -> Callable[[dict[str, Any]], Any]:
    return functools.partial(_apply_dict, item)


def _apply_dict(item: Item, sample: dict[str, Any]) -> Any:
    return item(sample["image"], sample["label"], sample.get("key", ""))


def _folder_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    files = _files(src)
    return Indexed(len(files), files.__getitem__, functools.partial(_read_file, item)), DataLoader


def _read_file(item: Item, entry: tuple[Path, int]) -> Any:
    return item(entry[0].read_bytes(), entry[1], entry[0].stem)


def _wds_pack(src: Path, dst: Path, cfg: Config) -> None:
    import webdataset as wds

    dst.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(dst / "shard-%06d.tar"), maxsize=cfg.shard_bytes, verbose=0) as sink:
        for path, label in _files(src):
            sink.write({"__key__": f"{label}/{path.stem}", "jpg": path.read_bytes(), "cls": str(label).encode()})


def _wds_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    import webdataset as wds

    urls = sorted(str(p) for p in packed.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False).shuffle(1000)
    return Mapped(dataset, functools.partial(_wds_item, item)), DataLoader


def _wds_remote(store: Store, cache: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    import webdataset as wds

    # WebDataset streams the tars from http(s) URLs, which its gopen pipes through curl.
    urls = [store.http_url(name) for name in sorted(store.objects) if name.endswith(".tar")]
    dataset = wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False).shuffle(1000)
    return Mapped(dataset, functools.partial(_wds_item, item)), DataLoader


def _wds_item(item: Item, sample: dict[str, Any]) -> Any:
    return item(sample["jpg"], int(sample["cls"]), sample["__key__"])


def _mosaic_pack(src: Path, dst: Path, cfg: Config) -> None:
    from streaming import MDSWriter

    columns = {"image": "bytes", "label": "int", "key": "str"}
    with MDSWriter(out=str(dst), columns=columns, size_limit=cfg.shard_bytes, progress_bar=False) as out:
        for path, label in _files(src):
            out.write({"image": path.read_bytes(), "label": label, "key": path.stem})


def _mosaic_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # a previous run's shared memory would make the next one fail
    dataset = StreamingDataset(local=str(packed), shuffle=True, shuffle_seed=0, batch_size=cfg.batch)
    return Mapped(dataset, _sample_fn(item)), DataLoader


def _mosaic_remote(store: Store, cache: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    os.environ.update(S3_ENDPOINT_URL=store.endpoint, AWS_ACCESS_KEY_ID=store.key, AWS_SECRET_ACCESS_KEY=store.secret,
                      AWS_DEFAULT_REGION=store.region)  # how Streaming is pointed at an S3-compatible store
    dataset = StreamingDataset(remote=store.s3_url, local=str(cache), shuffle=True, shuffle_seed=0,
                               batch_size=cfg.batch)
    return Mapped(dataset, _sample_fn(item)), DataLoader


def _litdata_pack(src: Path, dst: Path, cfg: Config) -> None:
    import litdata

    inputs = [(str(path), label) for path, label in _files(src)]
    litdata.optimize(fn=_litdata_sample, inputs=inputs, output_dir=str(dst), chunk_bytes=cfg.shard_bytes,
                     num_workers=cfg.workers, mode="overwrite", verbose=False)


def _litdata_sample(entry: tuple[str, int]) -> dict[str, Any]:
    path = Path(entry[0])
    return {"image": path.read_bytes(), "label": entry[1], "key": path.stem}


def _litdata_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    import litdata

    dataset = litdata.StreamingDataset(input_dir=str(packed), shuffle=True, seed=0, transform=_sample_fn(item))
    return dataset, litdata.StreamingDataLoader


def _litdata_remote(store: Store, cache: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    import litdata

    options = {"endpoint_url": store.endpoint, "aws_access_key_id": store.key,
               "aws_secret_access_key": store.secret, "region_name": store.region}  # for LitData's S3 client
    dataset = litdata.StreamingDataset(input_dir=store.s3_url, cache_dir=str(cache), shuffle=True, seed=0,
                                       transform=_sample_fn(item), storage_options=options)
    return dataset, functools.partial(litdata.StreamingDataLoader, worker_init_fn=_litdata_allow_http)


def _litdata_allow_http(worker_id: int) -> None:
    """LitData's obstore downloads refuse a plain-HTTP endpoint (the store is not HTTPS) and take no option for it."""
    from litdata.streaming import downloader

    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True  # in each worker: its loader does not fork them


def _hf_pack(src: Path, dst: Path, cfg: Config) -> None:
    from datasets import Dataset as HFDataset
    from datasets import Features, Value
    from datasets import Image as HFImage

    files = _files(src)
    features = Features({"image": HFImage(), "label": Value("int64"), "key": Value("string")})
    table = {"image": [{"bytes": p.read_bytes(), "path": None} for p, _ in files],
             "label": [label for _, label in files], "key": [p.stem for p, _ in files]}
    HFDataset.from_dict(table, features=features).save_to_disk(str(dst), max_shard_size=cfg.shard_bytes,
                                                               num_proc=cfg.workers)


def _hf_dataset(src: Path, packed: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    from datasets import Image as HFImage
    from datasets import load_from_disk

    table = load_from_disk(str(packed)).cast_column("image", HFImage(decode=False))
    return Indexed(len(table), table.__getitem__, functools.partial(_hf_item, item)), DataLoader


def _hf_remote(store: Store, cache: Path, cfg: Config, item: Item) -> tuple[Any, Callable[..., Any]]:
    from datasets import Image as HFImage
    from datasets import load_dataset

    # save_to_disk's shards are Arrow streams, which the "arrow" builder reads from URLs, downloading every file into
    # its cache first. load_from_disk(s3://...) would list the folder first, which a read-only store does not serve.
    urls = [store.http_url(name) for name in sorted(store.objects) if name.endswith(".arrow")]
    table = load_dataset("arrow", data_files=urls, split="train", cache_dir=str(cache))
    table = table.cast_column("image", HFImage(decode=False))
    return Indexed(len(table), table.__getitem__, functools.partial(_hf_item, item)), DataLoader


def _hf_item(item: Item, row: dict[str, Any]) -> Any:
    return item(row["image"]["bytes"], row["label"], row["key"])


PEERS = (
    Peer("stoker", "stoker", "stoker", _stoker_pack, _stoker_dataset, _stoker_remote),
    Peer("ImageFolder + DataLoader", "torch", "torch", None, _folder_dataset),
    Peer("WebDataset", "webdataset", "webdataset", _wds_pack, _wds_dataset, _wds_remote),
    Peer("MosaicML Streaming", "streaming", "mosaicml-streaming", _mosaic_pack, _mosaic_dataset, _mosaic_remote),
    Peer("LitData", "litdata", "litdata", _litdata_pack, _litdata_dataset, _litdata_remote),
    Peer("HF datasets", "datasets", "datasets", _hf_pack, _hf_dataset, _hf_remote),
)


# ---- measuring ----


def importable(peer: Peer) -> str | None:
    """None if the peer imports here, else why not."""
    try:
        __import__(peer.module)
        if peer.module == "stoker":
            # stoker imports its loader on first use; the peers' packages import whole above. Either way the
            # library's code is loaded before any timing, which starts at building a dataset.
            stoker.StreamingDataset, stoker.DataLoader  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a RuntimeError from a broken binary dependency
        return (f"cannot import {peer.module!r} (pip package {peer.package}) in {sys.executable}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return None


def pack_seconds(peer: Peer, src: Path, dst: Path, cfg: Config) -> float:
    """Best wall time of `rounds` packs into an emptied `dst`, including os.sync()."""
    best = float("inf")
    for _ in range(cfg.rounds):
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        peer.pack(src, dst, cfg)
        os.sync()
        best = min(best, time.perf_counter() - start)
    return best


def load_rate(peer: Peer, src: Path, packed: Path, cfg: Config, same_transform: bool) -> tuple[float, float, int]:
    """(images/s of a whole second epoch, seconds to the first batch of the first, images in the second epoch).

    The first epoch only warms up: it starts the (persistent) workers and opens the shards. Timing the second from
    iter() to its last batch leaves out start-up, yet cannot credit batches that were prefetched before the clock
    started, as timing "after the first batch" would.
    """
    item: Item = _encoded_item if same_transform or peer.name == "stoker" else _typical_item
    dataset, loader_class = peer.dataset(src, packed, cfg, item)
    collate = None
    if item is _encoded_item:
        collate = stoker.build_transform(stoker.TransformSpec(size=SIZE), backend="pil", seed=0)
    options: dict[str, Any] = {"persistent_workers": True} if cfg.workers else {}
    if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset):
        options["shuffle"] = True
    loader = loader_class(dataset, batch_size=cfg.batch, num_workers=cfg.workers, collate_fn=collate, **options)
    start = time.perf_counter()
    first = None
    for _ in loader:
        first = time.perf_counter() - start if first is None else first
    start = time.perf_counter()
    count = sum(_count(batch) for batch in loader)
    seconds = time.perf_counter() - start
    del loader  # stops the persistent workers
    return count / seconds, first or 0.0, count


def store_load_rate(peer: Peer, store: Store, cache: Path, cfg: Config) -> tuple[float, float, int]:
    """(images/s, seconds to the first batch, images) of one epoch from the object store with an empty cache, each
    as documented.

    Timed from building the dataset, so index downloads (and a download of everything first, where that is the
    system's way) count; every shard crosses the store's latency and per-connection rate once.
    """
    return _cold_epoch(peer, lambda item: peer.remote(store, cache, cfg, item), cfg)


def cold_local_rate(peer: Peer, src: Path, packed: Path, cfg: Config) -> tuple[float, float, int]:
    """The same as `store_load_rate`, from the local packed files: what the store leg would give if the store cost
    nothing (workers start, shards open, nothing is warm)."""
    return _cold_epoch(peer, lambda item: peer.dataset(src, packed, cfg, item), cfg)


def _cold_epoch(peer: Peer, build: Callable[[Item], tuple[Any, Callable[..., Any]]],
                cfg: Config) -> tuple[float, float, int]:
    item: Item = _encoded_item if peer.name == "stoker" else _typical_item
    collate = stoker.build_transform(stoker.TransformSpec(size=SIZE), backend="pil", seed=0) if item is _encoded_item else None
    start = time.perf_counter()
    dataset, loader_class = build(item)
    options: dict[str, Any] = {"shuffle": True} if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) else {}
    loader = loader_class(dataset, batch_size=cfg.batch, num_workers=cfg.workers, collate_fn=collate, **options)
    first, count = None, 0
    for batch in loader:
        first = time.perf_counter() - start if first is None else first
        count += _count(batch)
    return count / (time.perf_counter() - start), first or 0.0, count


def _count(batch: Any) -> int:
    return len(batch["label"]) if isinstance(batch, dict) else len(batch[1])


def run(cfg: Config, peers: tuple[Peer, ...], work: Path) -> dict[str, Any]:
    """Every measurement for every peer; failures are recorded per peer, never raised.

    Each pack and each round of loads runs in a fresh child process: libraries leave state behind (LitData's
    optimize() slowed every later DataLoader's start-up 8x here), and one system must not tax the next. All
    systems pack first; then each round loads with every system in turn, so a burst of load on a shared machine
    hits one round of everyone rather than all rounds of one system. Each figure is its best round.
    """
    src = _data.image_tree(per_class=cfg.per_class)
    nbytes = sum(len(p.read_bytes()) for p, _ in _files(src))  # also warms the page cache, for everyone alike
    _tiny_tree(src, work / "tiny")
    results: dict[str, Any] = {"input_mb": nbytes / 1e6, "images": len(_files(src)), "peers": {}}
    for peer in peers:
        results["peers"][peer.name] = {"package": peer.package, "error": None, **_child(peer, "pack", cfg, work)}
    for _ in range(cfg.rounds):
        for peer in peers:
            row = results["peers"][peer.name]
            if row["error"] is not None:
                continue
            loads = _child(peer, "load", cfg, work)
            row["error"] = loads.pop("error", None)
            results["per_sample_transform"] = loads.pop("per_sample", results.get("per_sample_transform"))
            _keep_best(row, loads)
    if cfg.store_latency_ms is not None:
        results["store"] = _store_rounds(cfg, peers, work, results["peers"])
    if "typical" in results["peers"].get("stoker", {}):  # stoker's typical path already is its own batch transform
        results["peers"]["stoker"]["same_transform"] = results["peers"]["stoker"]["typical"]
    return results


def _keep_best(row: dict[str, Any], loads: dict[str, Any]) -> None:
    for mode, (rate, first, count) in loads.items():
        if rate > row.get(mode, 0):
            row[mode], row[f"{mode}_first_batch_s"], row[f"{mode}_images"] = rate, first, count


def _store_rounds(cfg: Config, peers: tuple[Peer, ...], work: Path, rows: dict[str, Any]) -> str:
    """Load every packed dataset from the object store on 127.0.0.1 (nginx, `stoker.testing.ObjectStore`),
    `rounds` times each. Returns what the leg ran against, or why it could not run (then no store figures)."""
    from stoker import testing

    if not testing.available():
        return f"not run: {testing.INSTALL_HINT}"
    latency, rate = cfg.store_latency_ms / 1000, cfg.store_rate_mb * 1e6
    with testing.ObjectStore(work, latency=latency, rate=rate, bucket="peers") as server:
        stores: dict[str, Store] = {}
        for peer in peers:
            packed = work / peer.package
            if peer.remote is None or rows[peer.name]["error"] is not None or not packed.is_dir():
                continue
            objects = tuple(str(p.relative_to(packed)) for p in sorted(packed.rglob("*")) if p.is_file())
            stores[peer.name] = Store(server.endpoint_url, server.bucket, peer.package, objects, testing.KEY,
                                      testing.SECRET, testing.REGION)
        for _ in range(cfg.rounds):
            for peer in peers:
                if peer.name in stores:
                    loads = _child(peer, "storeload", cfg, work, {"PEERS_STORE": json.dumps(asdict(stores[peer.name]))})
                    rows[peer.name].setdefault("store_error", loads.pop("error", None))
                    _keep_best(rows[peer.name], loads)
    return (f"nginx on 127.0.0.1 (stoker.testing.ObjectStore), {cfg.store_latency_ms} ms before every first byte, "
            f"{cfg.store_rate_mb} MB/s per connection, read-only; cold cache, one epoch")


def _child(peer: Peer, task: str, cfg: Config, work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `task` for `peer` in a fresh interpreter and return its JSON result, or {"error": why it failed}."""
    command = [sys.executable, __file__, "--child", peer.package, task, str(work), json.dumps(asdict(cfg))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"{task} took more than {CHILD_TIMEOUT_S} s"}
    finally:  # progress on stderr: which system is running, and for how long
        print(f"  {peer.name} {task}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return {"error": f"{task} failed (exit {proc.returncode}): {last[0].strip()}"}


def child_main(package: str, task: str, work: Path, cfg: Config) -> dict[str, Any]:
    """One task for one system, in this fresh process: "pack" (times, then leaves the shards) or "load"."""
    peer = next(p for p in PEERS if p.package == package)
    reason = importable(peer)
    if reason:
        return {"error": reason}
    src = _data.image_tree(per_class=cfg.per_class)
    packed = work / peer.package
    if task == "pack":
        if peer.pack is None:  # reads the raw tree in place
            packed.symlink_to(src, target_is_directory=True)
            return {}
        peer.pack(work / "tiny", work / f"warm-up-{package}", cfg)  # untimed: first-call imports and caches
        shutil.rmtree(work / f"warm-up-{package}")
        row = {"pack_s": pack_seconds(peer, src, packed, cfg)}
        if peer.name == "stoker":  # stoker checks every JPEG header by default; the peers check nothing
            row["pack_unvalidated_s"] = pack_seconds(replace(peer, pack=_stoker_pack_unvalidated), src, packed, cfg)
        return row
    # Import torchvision once here: forked workers inherit it instead of each importing it again.
    transform = "PIL (torchvision missing)" if _augment() is _pil_augment else "torchvision.transforms.v2"
    if task == "storeload":
        fields = json.loads(os.environ["PEERS_STORE"])
        store = Store(**{**fields, "objects": tuple(fields["objects"])})
        with tempfile.TemporaryDirectory(prefix=f"cache-{package}-") as cache:
            loads = {"store": store_load_rate(peer, store, Path(cache), cfg)}
        if peer.name == "stoker":  # the ceiling of its store leg, measured in the same process
            loads["cold_local"] = cold_local_rate(peer, src, packed, cfg)
        return loads
    modes = ("typical",) if peer.name == "stoker" else ("typical", "same_transform")
    return {"per_sample": transform, **{mode: load_rate(peer, src, packed, cfg, mode != "typical") for mode in modes}}


def report(results: dict[str, Any], cfg: Config) -> list[str]:
    """The table and the ratio lines (the last lines are the ratios run_all.py collects)."""
    images, mb = results["images"], results["input_mb"]
    lines = [f"input: {images} JPEGs ({mb:.1f} MB), {cfg.workers} workers, batch {cfg.batch}, "
             f"{cfg.shard_bytes >> 20} MB shards, best of {cfg.rounds}; torch {torch.__version__}; per-sample "
             f"transform of the typical peers: {results.get('per_sample_transform')}",
             f"store: {results.get('store', 'not run (--no-store)')}",
             f"{'system':26s} {'pack s':>8s} {'pack img/s':>10s} {'load img/s':>11s} {'same xform':>11s} {'store img/s':>11s}  notes"]
    for name, row in results["peers"].items():
        if row["error"] and "typical" not in row:
            lines.append(f"{name:26s} {'-':>8s} {'-':>10s} {'-':>11s} {'-':>11s} {'-':>11s}  {row['error']}")
            continue
        pack = row.get("pack_s")
        pack_text = (f"{pack:8.2f} {images / pack:10,.0f}") if pack else f"{'n/a':>8s} {'n/a':>10s}"
        note = f"first batch {row.get('typical_first_batch_s', 0):.2f} s"
        if row.get("pack_unvalidated_s"):
            note += f"; pack --validate none {row['pack_unvalidated_s']:.2f} s"
        if row.get("typical_images", images) != images:  # some loaders pad or drop to split evenly over workers
            note += f"; {row['typical_images']} images per epoch"
        if row.get("store"):
            note += f"; store first batch {row['store_first_batch_s']:.2f} s"
        note += f"; {row['error']}" if row["error"] else ""
        note += f"; store: {row['store_error']}" if row.get("store_error") else ""
        store_text = f"{row['store']:11,.0f}" if row.get("store") else f"{'n/a':>11s}"
        lines.append(f"{name:26s} {pack_text} {row.get('typical', 0):11,.0f} {row.get('same_transform', 0):11,.0f} {store_text}  {note}")
    lines += ratio_lines(results)
    ours = results["peers"].get("stoker", {})
    if ours.get("store") and ours.get("cold_local"):
        stores = [row["store"] for name, row in results["peers"].items() if name != "stoker" and row.get("store")]
        need = f"; 1.3x the best peer's store leg is {1.3 * max(stores):,.0f} img/s" if stores else ""
        lines.append(f"ratio stoker's store leg / the same cold epoch from the local files (timed from building the "
                     f"dataset, {ours['cold_local']:,.0f} img/s, first batch {ours['cold_local_first_batch_s']:.2f} s: "
                     f"the store leg's ceiling{need}): {ours['store'] / ours['cold_local']:.2f}x")
    return lines


def ratio_lines(results: dict[str, Any]) -> list[str]:
    """stoker over the best peer that ran, for loading (both modes) and packing."""
    rows = results["peers"]
    ours = rows.get("stoker", {})
    others = {name: row for name, row in rows.items() if name != "stoker" and not row["error"]}
    lines = []
    for key, what, goal in (("typical", "loading (each as documented)", 1.3),
                            ("same_transform", "loading (same batch transform)", None),
                            ("store", "remote loading from the object store (each as documented, cold cache)", 1.3),
                            ("pack_s", "packing", 1.5),
                            ("pack_unvalidated_s", "packing without validation, as the peers do", None)):
        candidates = {n: r.get("pack_s" if key.startswith("pack") else key) for n, r in others.items()}
        candidates = {n: value for n, value in candidates.items() if value}
        if not ours.get(key) or not candidates:
            lines.append(f"ratio {what} stoker / best peer: n/a (no peer or no stoker figure)")
            continue
        if key.startswith("pack"):  # times: lower is better
            best = min(candidates, key=candidates.__getitem__)
            ratio = candidates[best] / ours[key]
        else:
            best = max(candidates, key=candidates.__getitem__)
            ratio = ours[key] / candidates[best]
        target = f" (goal >= {goal}x)" if goal else ""
        lines.append(f"ratio {what} stoker / best peer ({best}): {ratio:.2f}x{target}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="images per class, 10 classes (default 100)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-mb", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of each measurement; the best is kept")
    parser.add_argument("--only", nargs="*", default=None, help="pip package names to run, e.g. webdataset")
    parser.add_argument("--store-latency-ms", type=int, default=20, help="object store: wait before every first byte")
    parser.add_argument("--store-rate-mb", type=int, default=100, help="object store: MB/s per connection")
    parser.add_argument("--no-store", action="store_true", help="skip loading from the object store (nginx)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)  # PACKAGE TASK WORK CONFIG
    args = parser.parse_args()
    torch.set_num_threads(1)  # the cores belong to the loader workers, for every system alike
    if args.child:
        package, task, work, config = args.child
        print(json.dumps(child_main(package, task, Path(work), Config(**json.loads(config)))))
        return
    cfg = Config(args.per_class, args.workers, args.batch, args.shard_mb << 20, args.rounds,
                 None if args.no_store else args.store_latency_ms, args.store_rate_mb)
    peers = tuple(p for p in PEERS if args.only is None or p.package in args.only or p.name == "stoker")
    _data.image_tree(per_class=cfg.per_class)  # generate once here, not in racing children
    with tempfile.TemporaryDirectory(prefix="stoker-peers-") as tmp:
        results = run(cfg, peers, Path(tmp))
    results["config"] = asdict(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n".join(report(results, cfg)))


if __name__ == "__main__":
    main()
