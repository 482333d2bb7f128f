"""Command line: `pack-dataset SRC DST` and `stoker {pack,inspect,verify,demo}`."""

from __future__ import annotations

import argparse
import os
import re
import sys

from stoker import __version__
from stoker.errors import ConfigError, StokerError
from stoker.options import parse_size as size_in_bytes


def parse_size(text: str) -> int:
    """'256MB' -> 268435456: `stoker.options.parse_size` for argparse."""
    try:
        return size_in_bytes(text, "size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Errors name options as the Python API spells them; the command line shows its own flags for the same options.
_FLAGS = (("on_error='skip'", "--on-error skip"), ("overwrite=True", "--overwrite"), ("part=(I, N)", "--part I/N"),
          ("tokenizer='none'", "--tokenizer none"), ("files_from", "--files-from"), ("text_field", "--text-field"),
          ("vocab_size", "--vocab-size"), ("max_side=", "--max-side "), ("shard_size=", "--shard-size "),
          ("tokenizer=", "--tokenizer "), ("on_error=", "--on-error "), ("validate=", "--validate "),
          ("workers=", "--workers "), ("engine=", "--engine "), ("ray_address=", "--ray-address "),
          ("max_retries=", "--max-retries "), ("format=", "--format "), ("part=", "--part "),
          ("seconds=", "--seconds "), ("batch_size=", "--batch-size "), ("num_gpus=", "--gpus "))


def cli_wording(message: str) -> str:
    """An error message with the Python option names replaced by the command line's flags."""
    for python, flag in _FLAGS:
        message = re.sub(r"(?<![\w.])" + re.escape(python), lambda _: flag, message)
    return message


def _parse_part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, for example 0/8 (I counts from 0)")
    return int(match.group(1)), int(match.group(2))


def _pack_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="image tree SRC/<class>/<file>, or a .jsonl/.txt/.parquet file or folder of them; "
                                    "a path or fsspec URL (s3://bucket/prefix)")
    parser.add_argument("dst", help="output directory or fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--format", choices=["arrow", "msgpack"], default="arrow")
    parser.add_argument("--workers", type=int, default=None, help="shards written in parallel: threads for images, processes for text (default: all cores)")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("256MB"), help="target shard size (default 256MB)")
    parser.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this, re-encoding as JPEG")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when --max-side re-encodes (default 90)")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="stop at a bad input (default) or skip and list it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DST")
    parser.add_argument("--validate", choices=["none", "header", "decode"], default="header",
                        help="image checks: header+completeness (default), decode at reduced size (thorough), none")
    parser.add_argument("--kind", choices=["image", "text"], default=None, help="default: detected from SRC")
    parser.add_argument("--text-field", default="text", help="JSON field or Parquet column holding the text (default 'text')")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes', 'none' (pre-tokenized ids) or a tokenizer.json path")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size of pre-tokenized ids")
    parser.add_argument("--part", type=_parse_part, default=None, metavar="I/N",
                        help="pack only slice I of N (array jobs); combine with `stoker merge DST`")
    parser.add_argument("--files-from", default=None,
                        help="file (path or URL) listing SRC-relative image paths, one per line, optionally `path<TAB>size`, "
                             "instead of listing SRC")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="run shard jobs on local workers (default) or as Ray tasks (needs stoker[ray])")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join ('auto', ray://host:10001); default: start a local Ray instance")
    parser.add_argument("--max-retries", type=int, default=3, help="Ray: reruns of a shard task that died (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run_pack(args: argparse.Namespace) -> int:
    from stoker.formats.pack import PackOptions, pack_dataset

    options = PackOptions(
        format=args.format, shard_size=args.shard_size, workers=args.workers, max_side=args.max_side,
        quality=args.quality, on_error=args.on_error, overwrite=args.overwrite, validate=args.validate,
        kind=args.kind, text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        part=args.part, files_from=args.files_from, progress=not args.quiet,
        engine=args.engine, ray_address=args.ray_address, max_retries=args.max_retries,
    )
    result = pack_dataset(args.src, args.dst, options)
    m = result.manifest
    rate = result.samples / max(result.seconds, 1e-9)
    print(
        f"packed {m.num_samples:,} {m.kind} samples into {len(m.shards)} {m.format} shards "
        f"({result.bytes_out / 1e6:,.1f} MB) in {result.seconds:.2f} s: {rate:,.0f} samples/s, "
        f"{result.bytes_in / 1e6 / max(result.seconds, 1e-9):,.1f} MB/s in; "
        f"skipped {result.skipped}; reused {result.reused_shards} finished shards"
    )
    for item in m.skipped[:20]:
        print(f"  skipped {item['path']}: {item['error']}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from stoker.summary import inspect

    print("\n".join(inspect(args.dataset)))
    return 0


VERIFY_OK, VERIFY_DAMAGED, VERIFY_UNCHECKED = 0, 1, 2


def _run_verify(args: argparse.Namespace) -> int:
    from stoker import storage
    from stoker.errors import ManifestError
    from stoker.formats.manifest import Manifest
    from stoker.formats.verify import verify

    where = storage.redact(args.dataset)
    try:
        manifest = Manifest.load(args.dataset)
        problems = verify(args.dataset, deep=args.deep, manifest=manifest)
    except ManifestError as exc:
        print(f"BAD manifest: {exc}")
        print(f"{where}: damaged (its manifest cannot be trusted); no shard was checked")
        return VERIFY_DAMAGED
    except Exception as exc:  # noqa: BLE001 - "could not check" is an answer, a traceback is not
        print(f"could not check {where}: {type(exc).__name__}: {storage.redact_text(str(exc))[:500]}",
              file=sys.stderr)
        return VERIFY_UNCHECKED
    for problem in problems:
        print(f"BAD {problem}")
    total = len(manifest.shards)
    bad_shards = len({p.shard for p in problems})
    bad_rows = sum(p.row is not None for p in problems)
    summary = f"{total - bad_shards}/{total} shards verified"
    if problems:
        summary += f"; {bad_shards} bad" + (f" ({bad_rows} bad rows)" if bad_rows else "")
    print(summary)
    return VERIFY_DAMAGED if problems else VERIFY_OK


def _run_merge(args: argparse.Namespace) -> int:
    from stoker.formats.merge import merge

    manifest = merge(args.dataset)
    print(f"merged {manifest.options['parts']} parts: {manifest.num_samples:,} samples in {len(manifest.shards)} shards")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from stoker.demo import run_demo

    run_demo(args.workdir, per_class=args.per_class)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from stoker.perf.bench import run_cli

    return run_cli(args)


def _guard(run, args: argparse.Namespace) -> int:
    try:
        return run(args)
    except StokerError as exc:
        print(f"error: {cli_wording(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def pack_main(argv: list[str] | None = None) -> int:
    """Entry point of the `pack-dataset` console script."""
    parser = _pack_parser(argparse.ArgumentParser(prog="pack-dataset", description="Pack a raw dataset into shards."))
    parser.add_argument("--version", action="version", version=f"pack-dataset (stoker {__version__})")
    return _guard(_run_pack, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stoker` console script."""
    parser = argparse.ArgumentParser(prog="stoker", description="Keep accelerators fed.")
    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _pack_parser(sub.add_parser("pack", help="same as pack-dataset")).set_defaults(run=_run_pack)
    p = sub.add_parser("inspect", help="summarise a packed dataset")
    p.add_argument("dataset")
    p.set_defaults(run=_run_inspect)
    p = sub.add_parser("verify", help="recompute shard checksums and check every value; exit 1 naming every bad "
                                      "shard and row, 2 if the dataset could not be read")
    p.add_argument("dataset")
    p.add_argument("--deep", action="store_true", help="also decode every image and check every token array")
    p.set_defaults(run=_run_verify)
    p = sub.add_parser("merge", help="combine the parts of `pack-dataset --part I/N` into manifest.json")
    p.add_argument("dataset")
    p.set_defaults(run=_run_merge)
    p = sub.add_parser("demo", help="generate data, pack it, read it back and summarise")
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), "demo-data"))
    p.add_argument("--per-class", type=int, default=150)
    p.set_defaults(run=_run_demo)
    from stoker.perf.bench import add_arguments as bench_arguments  # argparse only: torch loads when it runs

    p = sub.add_parser("bench", help="time each input stage on this machine and judge whether it feeds the GPUs")
    bench_arguments(p).set_defaults(run=_run_bench)
    args = parser.parse_args(argv)
    return _guard(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
