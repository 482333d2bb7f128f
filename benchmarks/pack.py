"""pack-dataset throughput vs the speed of light of the same bytes (`cp -r SRC`), in one run.

Goal: packing without --max-side reaches >= 0.5x of a raw copy. Prints the ratio on the last line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import _data

from stoker.formats.pack import pack_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    src = _data.image_tree(per_class=args.per_class)
    nbytes, count = _data.tree_bytes(src), sum(1 for _ in src.rglob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="stoker-bench-pack-"))
    subprocess.run(["cat", *map(str, src.rglob("*.jpg"))], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    def copy() -> None:
        shutil.rmtree(work / "copy", ignore_errors=True)
        subprocess.run(["cp", "-r", str(src), str(work / "copy")], check=True)
        os.sync()

    def pack(**options):
        def run() -> None:
            pack_dataset(str(src), str(work / "shards"), workers=args.workers, shard_size=8 << 20,
                         overwrite=True, progress=False, **options)
            os.sync()
        return run

    try:
        cp_s = _data.best_of(args.repeats, copy)
        fast_s = _data.best_of(args.repeats, pack(validate="none"))
        full_s = _data.best_of(args.repeats, pack(validate="header"))
        deep_s = _data.best_of(1, pack(validate="decode"))
        small_s = _data.best_of(1, pack(max_side=256))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"input: {count} JPEGs, {nbytes / 1e6:.1f} MB, {args.workers} workers, 8 MB shards")
    for name, secs in (("cp -r (speed of light)", cp_s), ("pack --validate none", fast_s), ("pack (default: header check)", full_s), ("pack --validate decode", deep_s), ("pack --max-side 256", small_s)):
        print(f"{name:28s} {secs:7.3f} s  {count / secs:9,.0f} img/s  {nbytes / secs / 1e6:8.1f} MB/s")
    print(f"ratio pack --validate none / cp: {cp_s / fast_s:.2f}x")
    print(f"ratio pack (default) / cp: {cp_s / full_s:.2f}x (goal >= 0.5x)")


if __name__ == "__main__":
    main()
