"""`stoker bench --tune`: a short offline sweep of num_workers x prefetch_factor on the user's shards.

Each setting runs the real loader (as `stoker bench` builds it) for a bounded time after its first batch, with no
consumer, so the rate measured is what the input pipeline can deliver. The recommendation is the cheapest setting
(fewest workers, then the shallowest prefetch) that feeds the consumption rate with 10% to spare, or, when none
does or no rate was given, the cheapest within 5% of the fastest. `num_workers="auto"` does the same online.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stoker.formats.manifest import Manifest
from stoker.perf.loaders import count_items, make_loader
from stoker.perf.stages import BenchOptions
from stoker.perf.timing import usable_cores
from stoker.perf.verdict import Consumption

PREFETCHES = (2, 4, 8)
SPARE = 1.10  # feed the consumer with this much to spare
NEAR_BEST = 0.95


@dataclass(frozen=True)
class Trial:
    workers: int
    prefetch: int | None
    rate: float | None  # items/s
    first_batch_s: float | None
    note: str = ""


@dataclass(frozen=True)
class Sweep:
    source: str
    unit: str
    trials: tuple[Trial, ...]
    best: Trial | None
    consumption: Consumption | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "unit": self.unit, "trials": [vars(t) for t in self.trials],
                "recommended": None if self.best is None else vars(self.best), "why": self.why,
                "consumption": None if self.consumption is None else vars(self.consumption)}


def settings(cores: int) -> list[tuple[int, int | None]]:
    """(workers, prefetch) to try: 0 workers once, then 1..cores+1 workers at each prefetch depth."""
    return [(0, None)] + [(w, p) for w in range(1, cores + 2) for p in PREFETCHES]


def measure(source: str, options: BenchOptions, image: bool, batch: int, workers: int,
            prefetch: int | None) -> Trial:
    """Items/s of one setting over `options.seconds` after its first batch (epochs wrap around)."""
    try:
        loader, _ = make_loader(source, image=image, batch_size=batch, workers=workers, prefetch=prefetch or 2,
                                size=options.size, storage_options=options.storage_options)
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first = time.perf_counter() - start
        items, start = 0, time.perf_counter()
        while time.perf_counter() - start < options.seconds:
            got = next(batches, None)
            if got is None:
                batches = iter(loader)
                continue
            items += count_items(got, image)
        rate = items / (time.perf_counter() - start)
        del batches, loader  # stop the workers before the next setting starts its own
    except Exception as exc:  # noqa: BLE001 - one failing setting is reported, the others still run
        return Trial(workers, prefetch, None, None, f"{type(exc).__name__}: {exc}")
    return Trial(workers, prefetch, rate, first)


def sweep_settings(source: str, options: BenchOptions, *, consumption: Consumption | None = None,
                   manifest: Manifest | None = None) -> Sweep:
    """Measure every setting of `settings()` on `source` and pick one (see the module docstring); `manifest`:
    the dataset's, when the caller has already loaded it."""
    manifest = manifest or Manifest.load(source, options.storage_options)
    image = manifest.kind == "image"
    batch = options.batch(image)
    trials = tuple(measure(source, options, image, batch, w, p) for w, p in settings(usable_cores()))
    measured = [t for t in trials if t.rate is not None]
    if not measured:
        return Sweep(source, "img/s" if image else "tokens/s", trials, None, consumption, "no setting could run")
    fastest = max(t.rate for t in measured)
    need = None if consumption is None else consumption.rate * consumption.num_gpus * SPARE
    cheapest = sorted(measured, key=lambda t: (t.workers, t.prefetch or 0))
    enough = [t for t in cheapest if need is not None and t.rate >= need]
    if enough:
        best, why = enough[0], f"the cheapest setting that feeds {need:,.0f}/s (the consumption rate + 10%)"
    else:
        best = next(t for t in cheapest if t.rate >= NEAR_BEST * fastest)
        why = "the cheapest setting within 5% of the fastest"
        if need is not None:
            why += f"; none feeds {need:,.0f}/s: the input pipeline is the bottleneck (see `stoker bench`)"
    return Sweep(source, "img/s" if image else "tokens/s", trials, best, consumption, why)


def format_sweep(result: Sweep) -> str:
    lines = [f"stoker bench --tune: {result.source}", f"{'workers':>7}  {'prefetch':>8}  "
             f"{'rate (' + result.unit + ')':>16}  {'first batch':>11}  note"]
    for t in result.trials:
        rate = "-" if t.rate is None else f"{t.rate:,.0f}"
        first = "-" if t.first_batch_s is None else f"{t.first_batch_s:.2f} s"
        lines.append(f"{t.workers:>7}  {t.prefetch or '-':>8}  {rate:>16}  {first:>11}  {t.note}")
    if result.best is None:
        lines.append(f"no recommendation: {result.why}")
    else:
        b = result.best
        prefetch = f", prefetch_factor={b.prefetch}" if b.workers else ""
        lines.append(f"recommended: num_workers={b.workers}{prefetch} ({b.rate:,.0f} {result.unit}; {result.why})")
    return "\n".join(lines)
