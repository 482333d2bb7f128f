"""`stoker demo` / `make demo`: generate default data, pack it, read it back and print a summary. No downloads."""

from __future__ import annotations

import os
import time

from stoker.formats.pack import pack_dataset
from stoker.formats.verify import verify
from stoker.inspect import inspect
from stoker.synthetic import make_image_tree, make_text_corpus


def _generate(workdir: str, per_class: int) -> tuple[str, str]:
    images, text = os.path.join(workdir, "raw", "images"), os.path.join(workdir, "raw", "text", "corpus.jsonl")
    marker = os.path.join(workdir, "raw", f".generated-{per_class}")
    if not os.path.exists(marker):
        print(f"generating {10 * per_class} JPEGs in 10 classes and 2,000 text documents under {workdir}/raw ...")
        make_image_tree(images, num_classes=10, per_class=per_class, min_side=160, max_side=500, seed=0)
        make_text_corpus(text, num_docs=2000, seed=0)
        open(marker, "w").close()
    return images, text


def _read_back(shards: str) -> str:
    """Stream every sample once through the public loader and report the rate."""
    from stoker.formats.manifest import Manifest
    from stoker.formats.shard import open_shard

    manifest = Manifest.load(shards)
    start, rows, nbytes = time.perf_counter(), 0, 0
    for info in manifest.shards:
        with open_shard(os.path.join(shards, info.name), name=info.name) as reader:
            for batch in reader.iter_batches():
                rows += batch.num_rows
                nbytes += batch.nbytes
    seconds = time.perf_counter() - start
    return f"read back {rows:,} samples ({nbytes / 1e6:,.1f} MB) in {seconds:.2f} s: {rows / max(seconds, 1e-9):,.0f} samples/s"


def run_demo(workdir: str, *, per_class: int = 150) -> None:
    """Generate, pack (Arrow images, msgpack text), verify, read back and summarise."""
    images, text = _generate(workdir, per_class)
    for src, dst, fmt in ((images, "images-arrow", "arrow"), (text, "text-msgpack", "msgpack")):
        out = os.path.join(workdir, "shards", dst)
        result = pack_dataset(src, out, format=fmt, shard_size=16 << 20, overwrite=True, progress=False)
        print(f"\n== {dst}: packed {result.samples:,} samples in {result.seconds:.2f} s ({result.samples / max(result.seconds, 1e-9):,.0f}/s)")
        problems = verify(out)
        print(f"verify: {'all shards intact' if not problems else problems}")
        print("\n".join(inspect(out)))
        print(_read_back(out))
