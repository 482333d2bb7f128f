"""`stoker bench`: time each input stage on this machine's own data, then judge whether the pipeline feeds the GPUs.

Each stage runs alone for a bounded time (`seconds`, in rounds repeated until they agree), so a slow stage cannot
hide behind a fast one; `stoker.perf.stages` lists them. The rates then go to `stoker.perf.verdict.judge_pipeline`,
which models stoker's loader: each worker's stages one after another, the host-to-device copy overlapping them,
and the measured loader end to end as the pipeline's rate.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace

from stoker import storage
from stoker.errors import ConfigError
from stoker.formats.manifest import Manifest
from stoker.perf.diagnosis import RunFacts
from stoker.perf.monitor_report import pyplot
from stoker.perf.report import BenchReport, format_bench, machine_info, plot_bench
from stoker.perf.stages import DEFAULT_SECONDS, BenchOptions, dataset_stages
from stoker.perf.timing import Stage, StageResult, time_stage, usable_cores
from stoker.perf.tune import format_sweep, sweep_settings
from stoker.perf.verdict import Consumption, Verdict, judge_pipeline, resolve_consumption


def judge(stages: Sequence[StageResult], consumption: Consumption, unit: str,
          facts: RunFacts | None = None) -> Verdict:
    """Run `judge_pipeline` over the measured stages (unavailable ones and speed-of-light rows left out)."""
    rates = {s.name: s.rate for s in stages if s.rate is not None and not s.reference}
    if not rates:
        raise ConfigError("no stage could be measured, so there is nothing to judge; see the notes of each stage")
    if consumption.unit != unit:
        raise ConfigError(f"the consumption rate is in {consumption.unit} but the stages are measured in {unit}")
    busy = next((s.busy for s in stages if s.name == "loader" and s.rate is not None), None)
    return judge_pipeline(rates, consumption.rate, consumption.num_gpus, unit=unit, facts=facts, loader_busy=busy)


def bench_pipeline(stages: Sequence[Stage], seconds: float = DEFAULT_SECONDS, *,
                   consumption: Consumption | None = None, unit: str = "items/s") -> BenchReport:
    """Time arbitrary stages one after another and judge them; the core of `bench_dataset`, usable on its own."""
    results = tuple(time_stage(stage, seconds) for stage in stages)
    verdict = judge(results, consumption, unit) if consumption is not None else None
    return BenchReport("custom", "custom", unit, results, consumption, verdict, {"seconds": seconds}, machine_info())


def bench_facts(source: str, image: bool, workers: int) -> RunFacts:
    """What the advice may rely on for the loader `bench_dataset` measures (`loaders.make_loader`): images through
    stoker's Pillow transform as its collate_fn, or text through pad_collate; no per-sample transform either way."""
    import torch

    return RunFacts(num_workers=workers, usable_cores=usable_cores(), cuda=torch.cuda.is_available(),
                    has_stage_times=True, remote=not storage.is_local(source), source=storage.redact(source),
                    backend="pil" if image else None, images=image, sample_transform=False)


def bench_dataset(source: str, options: BenchOptions | None = None, *,
                  consumption: Consumption | None = None, manifest: Manifest | None = None) -> BenchReport:
    """Measure every stage of loading the packed dataset at `source` (directory or URL) and judge the result;
    `manifest`: the dataset's, when the caller has already loaded it."""
    options = options or BenchOptions()
    manifest = manifest or Manifest.load(source, options.storage_options)
    if not manifest.num_samples:
        raise ConfigError(f"{storage.redact(source)} holds no samples; nothing to measure")
    image = manifest.kind == "image"
    unit = "img/s" if image else "tokens/s"
    batch = options.batch(image)
    workers = usable_cores() if options.workers is None else options.workers
    results = dataset_stages(source, manifest, options)
    facts = bench_facts(source, image, workers)
    verdict = judge(results, consumption, unit, facts) if consumption is not None else None
    settings = {"seconds": options.seconds, "batch_size": batch, "workers": workers,
                "transform": f"pil, {options.size} px" if image else "pad_collate", "samples": manifest.num_samples,
                "shards": len(manifest.shards), "bytes": manifest.num_bytes, "format": manifest.format}
    return BenchReport(storage.redact(source), manifest.kind, unit, tuple(results), consumption, verdict, settings,
                       machine_info())


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
    # Bad values raise here, before minutes of measuring, worded for the Python API: `stoker`'s error handler shows
    # the command line's flags instead (`cli.cli_wording`).
    options = BenchOptions(seconds=args.seconds, batch_size=args.batch_size, workers=args.workers, size=args.size)
    if args.plot:
        pyplot("stoker bench --plot")
    manifest = Manifest.load(args.dataset)
    image = manifest.kind == "image"
    batch = options.batch(image)
    # For text, a step of `batch` sequences consumes `batch` x the mean sequence length in tokens.
    per_sample = 1.0 if image else float(manifest.lengths.mean()) if manifest.num_samples else 0.0
    consumption = resolve_consumption(step_time=args.step_time, items_per_step=batch * per_sample, model=args.model,
                                      gpu=args.gpu, num_gpus=args.gpus, unit="img/s" if image else "tokens/s")
    if args.tune:
        seconds = args.seconds if args.seconds != DEFAULT_SECONDS else 2.0
        result = sweep_settings(args.dataset, replace(options, seconds=seconds), consumption=consumption,
                                manifest=manifest)
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_sweep(result))
        return 0
    report = bench_dataset(args.dataset, options, consumption=consumption, manifest=manifest)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_bench(report))
    if args.plot:
        plot_bench(report, args.plot)
        if not args.json:
            print(f"plot saved to {args.plot}")
    return 0

