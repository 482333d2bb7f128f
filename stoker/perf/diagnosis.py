"""The monitor's verdict: is a training loop starving, which stage of the loader is to blame, and what to change.

Pure functions over numbers the monitor measured, so every rule is tested from a table:

- start-up (the first batches of each pass, while workers start and open their first shards) is reported apart;
  only the steady state decides STARVING, and a run with too few steady steps is called too short to judge;
- the stage is named from the loader's `stage_times()` (busy seconds per stage, summed over its workers): a stage
  that runs in every worker costs the loop its time divided by the workers, one in the training process all of it;
  with workers, the loader works while the step computes, so a stage is blamed only when it is slower than the
  step (alone, or with the other stages each worker runs one after another); when none is, the wait is the hand-off
  of each batch to the training process and the verdict says so instead of naming a stage;
- the advice is in stoker's own knobs and only what this run can still change (no "more workers" when the loader
  already has a worker per usable core, no GPU backend without a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Stages that run in the training process, one batch after another, whatever the number of workers.
MAIN_PROCESS_STAGES = frozenset({"receive", "pin"})
# Fewer steady steps than this and a fraction of step time is mostly noise: the report says so instead of judging.
MIN_STEADY_STEPS = 10

STARVING, KEEPING_UP, TOO_SHORT = "STARVING", "keeping up", "too short to judge"
BACKENDS = ("pil", "dali", "kornia")  # stoker's augment backends, in the order ranks exchange them

_DESCRIPTIONS = {
    "fetch": "remote reads",
    "read": "local shard reads",
    "decode": "decode",
    "augment": "augment",
    "transform": "the transform / collate_fn",
    "collate": "collate",
    "handoff": "sending batches to the training process (pickling in the workers)",
    "receive": "taking batches in (unpickling in the training process)",
    "pin": "pin_memory in the training process",
}


@dataclass(frozen=True)
class RunFacts:
    """What the monitor knows about the loader it watches; advice is only given where these make it true."""

    num_workers: int | None = None  # None: not a loader with workers (a generator, a list)
    usable_cores: int = 1
    cuda: bool = False  # a CUDA GPU is available to this process
    has_stage_times: bool = False  # the loader exposes stoker's per-stage clocks
    remote: bool = False  # shards come from object storage
    source: str | None = None  # the dataset's location, credentials already removed
    parallel_reads: int | None = None  # ReadOptions.parallel_reads, when known
    prefetch_shards: int | None = None  # ReadOptions.prefetch_shards
    part_size: int | None = None  # ReadOptions.part_size: bytes per ranged read
    shard_bytes: float | None = None  # mean shard size
    cache_dir: str | None = None
    backend: str | None = None  # stoker's augment backend ("pil", "dali", "kornia"), when it is the collate_fn
    pin_memory: bool = False
    images: bool | None = None  # the shards hold images (False: text), when known
    sample_transform: bool | None = None  # the dataset runs a per-sample transform (False: the stage is collate_fn)


@dataclass(frozen=True)
class Phase:
    """Steps of one phase (start-up or steady state) and where their time went."""

    steps: int
    wait_s: float
    compute_s: float

    @property
    def fraction(self) -> float:
        """Share of this phase's time spent waiting for data; NaN with no steps."""
        elapsed = self.wait_s + self.compute_s
        return self.wait_s / elapsed if self.steps and elapsed > 0 else math.nan


def startup_steps(num_workers: int | None) -> int:
    """Steps at the start of each pass counted as start-up: each worker's first batch carries its start-up."""
    return max(1, num_workers or 0)


def state(steady: Phase, threshold: float, min_steps: int = MIN_STEADY_STEPS) -> str:
    """STARVING, keeping up, or too short to judge, from the steady state alone."""
    if steady.steps < min_steps or math.isnan(steady.fraction):
        return TOO_SHORT
    return STARVING if steady.fraction > threshold else KEEPING_UP


def stage_costs(stage_times: Mapping[str, float], batches: int, num_workers: int | None) -> dict[str, float]:
    """Seconds each stage costs the training loop per batch: worker stages run `num_workers` at a time."""
    if batches < 1:
        return {}
    lanes = max(1, num_workers or 0)
    return {name: seconds / batches / (1 if name in MAIN_PROCESS_STAGES else lanes)
            for name, seconds in stage_times.items() if seconds > 0}


def slowest_stage(costs: Mapping[str, float]) -> str | None:
    """The stage with the largest cost per batch, or None when nothing was timed."""
    return max(costs, key=costs.__getitem__) if costs else None


def step_seconds(steady: Phase) -> float:
    """Compute per steady step: the time the loader has to deliver each batch in without the loop waiting."""
    return steady.compute_s / steady.steps if steady.steps > 0 else 0.0


def blamed_stage(costs: Mapping[str, float], steady: Phase, num_workers: int | None) -> str | None:
    """The stage to blame for a starving loop, or None when no stage is slower than the step.

    Without workers every stage runs inside `next()`, so all of its time is waited for: the largest is to blame.
    With workers the loader runs while the step computes: a stage makes the loop wait only when its cost per batch
    exceeds the step, alone or with the stages each worker runs one after another (then the largest of those).
    """
    stage = slowest_stage(costs)
    if stage is None or not num_workers:
        return stage
    step = step_seconds(steady)
    if costs[stage] > step:
        return stage
    in_workers = _worker_stages(costs)
    return slowest_stage(in_workers) if sum(in_workers.values()) > step else None


def _worker_stages(costs: Mapping[str, float]) -> dict[str, float]:
    # The stages each worker runs one after another for its batch (not those of the training process).
    return {name: cost for name, cost in costs.items() if name not in MAIN_PROCESS_STAGES}


def describe(stage: str, facts: RunFacts) -> str:
    """The stage in words, with what this run is doing there (e.g. "decode (CPU, pil, 2 workers)")."""
    text = _DESCRIPTIONS.get(stage, stage)
    if stage == "transform" and facts.backend is not None:
        text = "decode and augment in stoker's transform"
    workers = f"{facts.num_workers} worker{'s' if facts.num_workers != 1 else ''}" if facts.num_workers \
        else "in the training process" if facts.num_workers == 0 else ""
    if stage == "fetch":
        details = [facts.source or "object storage"]
        reads = _reads_per_shard(facts)
        if reads is not None:
            details.append(f"{reads} read{'s' if reads != 1 else ''} in flight per shard")
        if facts.prefetch_shards is not None:
            details.append(f"{facts.prefetch_shards} shards fetched ahead")
        return f"{text} ({', '.join(details)})"
    if stage in ("decode", "augment", "transform", "collate"):
        parts = ["CPU" if facts.backend in (None, "pil") else "GPU", facts.backend or "", workers]
        return f"{text} ({', '.join(p for p in parts if p)})"
    return text


def advice(stage: str | None, facts: RunFacts) -> tuple[str, ...]:
    """What to change for a loop starved at `stage` (None: the loader did not say where its time goes)."""
    more_workers = _more_workers(facts)
    if stage is None:
        lines = [] if facts.has_stage_times else [
            "This loader does not report per-stage times, so only the training process's wait is known: use "
            "stoker.DataLoader over a StreamingDataset to have the stage named, or run `stoker bench DATASET`."]
        return tuple(lines + more_workers)
    if stage == "fetch":
        lines = []
        reads = _reads_per_shard(facts)
        if reads is not None and facts.parallel_reads is not None and reads < facts.parallel_reads:
            # Small shards: one ranged read each, so parallel_reads cannot add requests in flight.
            mean = facts.shard_bytes
            size = f"{mean / 1e6:,.1f} MB" if mean >= 1e6 else f"{mean / 1e3:,.0f} kB"
            lines.append(f"Shards ({size} on average) are smaller than one ranged read, "
                         f"so each is a single request: raise ReadOptions.prefetch_shards (now "
                         f"{facts.prefetch_shards}) to have more in flight, or pack larger shards "
                         "(`pack-dataset --shard-size`) to pay the per-request latency less often.")
        elif facts.parallel_reads is not None:
            lines.append(f"Raise ReadOptions.parallel_reads (now {facts.parallel_reads}) and prefetch_shards: "
                         "object stores serve each connection slowly but many in parallel.")
        else:
            lines.append("Raise ReadOptions.parallel_reads and prefetch_shards: object stores serve each connection "
                         "slowly but many in parallel.")
        if facts.cache_dir is None:
            lines.append("Give StreamingDataset a cache_dir on local disk, so epochs after the first read locally.")
        return tuple(lines + more_workers)
    if stage == "read":
        lines = ["Keep the shards on local NVMe (or in the page cache: enough free RAM for the dataset); "
                 + ("cache_dir is where remote shards land, put it on the fastest disk." if facts.remote
                    else "network file systems page in slowly.")]
        return tuple(lines + more_workers)
    if stage in ("decode", "augment", "transform"):
        lines = []
        images = stage != "transform" or facts.images is not False  # image advice, unless the shards hold text
        if images and stage in ("decode", "transform"):
            lines.append("Pack with `pack-dataset --max-side N` (N near the model's input side) so each image "
                         "decodes fewer pixels.")
        if images and facts.cuda and facts.backend != "dali" and stage in ("decode", "transform"):
            lines.append("Decode on the GPU: build_transform(spec, backend='dali') (pip install 'stoker[gpu]').")
        if images and facts.cuda and facts.backend not in ("dali", "kornia") and stage in ("augment", "transform"):
            lines.append("Augment on the GPU: build_transform(spec, backend='kornia').")
        if stage == "augment":
            lines.append("Make each sample cheaper to augment: a smaller output (TransformSpec size), and no "
                         "colour jitter if it is on (the costliest op on a CPU).")
        if stage == "transform" and facts.backend is None and facts.sample_transform is False:
            lines.append("Your collate_fn is the slow part (it runs once per batch): build the batch with "
                         "whole-array numpy/torch operations rather than Python loops over its samples.")
        elif stage == "transform" and facts.backend is None:
            lines.append("Your transform runs once per sample in Python: do the work per batch (one tensor op on "
                         "the stacked batch)" + (" or use stoker.build_transform, which decodes and augments per "
                                                 "batch." if images else "."))
        return tuple(lines + more_workers)
    # Image batches shrink 4x as uint8 converted on the device; text batches are already integer token ids.
    images = facts.images is not False
    if stage == "collate":
        smaller = ("make each sample smaller before it is stacked (uint8 rather than float, cropped to the model's "
                   "input) and convert on the GPU after the copy" if images else
                   "read only the columns the model uses (StreamingDataset(columns=...)) and pad no further than "
                   "needed (pad_collate's pad_to_multiple_of)")
        return (f"Collating samples into batches is the slow part: {smaller}.", *more_workers)
    if stage in ("handoff", "receive"):
        smaller = ("hand out uint8 (4x fewer bytes than float32) and convert on the device" if images else
                   "return tensors from collate_fn, not Python lists or strings (pickled one object at a time)")
        return (f"Batches are slow to move from the workers: {smaller}; drop columns the model does not use "
                "(StreamingDataset(columns=...)).",)
    if stage == "h2d":
        return ("Copy with pin_memory=True and .to(device, non_blocking=True) so the copy overlaps compute"
                + ("; hand out uint8 and convert on the device (4x fewer bytes than float32)." if images else "."),)
    if stage == "loader":
        lines = ["Every stage alone is faster than the loader end to end: the time goes between them (handing "
                 "batches to the training process, waiting on the next shard). Raise prefetch_factor"
                 + (", and hand out uint8 so each batch is cheaper to move." if images else ".")]
        if facts.num_workers is not None and facts.num_workers >= facts.usable_cores:
            lines.append(f"The workers already use every core ({facts.num_workers} workers, {facts.usable_cores} "
                         "usable cores), so the training process competes with them for CPU: a machine with more "
                         "cores than workers is needed to reach the stages' rates.")
        return tuple(lines + more_workers)
    if stage == "pin":
        if not facts.cuda:
            return ("pin_memory=True costs a copy of every batch and only helps a copy to a CUDA GPU, which this "
                    "process does not have: set pin_memory=False.",)
        fewer = ("hand out uint8 and convert on the device" if images else
                 "drop columns the model does not use (StreamingDataset(columns=...))")
        return (f"pin_memory copies every batch in the training process: {fewer}, so fewer bytes are pinned.",)
    return (f"Stage {stage!r} has no built-in advice: profile it (py-spy, torch.profiler).", *more_workers)


def _reads_per_shard(facts: RunFacts) -> int | None:
    if facts.parallel_reads is None:
        return None
    if facts.shard_bytes is None or not facts.part_size:
        return facts.parallel_reads
    return max(1, min(facts.parallel_reads, math.ceil(facts.shard_bytes / facts.part_size)))


def _more_workers(facts: RunFacts) -> list[str]:
    if facts.num_workers is None or facts.num_workers >= facts.usable_cores:
        return []  # another worker would only share a core with one that is already busy
    if facts.num_workers == 0:
        return [f"Set num_workers (0 now: every batch is loaded in the training process; this machine lets it use "
                f"{facts.usable_cores} cores)."]
    return [f"Raise num_workers ({facts.num_workers} now, {facts.usable_cores} usable cores)."]


@dataclass(frozen=True)
class Diagnosis:
    """The monitor's verdict for one rank."""

    state: str  # STARVING, keeping up, too short to judge
    steady: Phase
    startup: Phase
    stage: str | None  # the stage to blame (`blamed_stage`) when starving, else None
    stage_costs: Mapping[str, float]  # seconds per batch each stage costs the loop (see `stage_costs`)
    headline: str  # one line, e.g. "STARVING 62% of step time: decode (CPU, pil, 2 workers)"
    advice: tuple[str, ...]


def diagnose(steady: Phase, startup: Phase, stage_times: Mapping[str, float] | None, facts: RunFacts,
             threshold: float, *, min_steps: int = MIN_STEADY_STEPS, where: str = "") -> Diagnosis:
    """Judge one rank: the state from the steady state, the stage and advice only when it is starving.

    `stage_times` are the busy seconds per stage over the steady steps (None when the loader reports none);
    `where` is appended to the headline's figure, e.g. " on rank 3".
    """
    verdict = state(steady, threshold, min_steps)
    costs = stage_costs(stage_times or {}, steady.steps, facts.num_workers)
    if verdict == TOO_SHORT:
        headline = (f"{TOO_SHORT}: {steady.steps} steady step{'s' if steady.steps != 1 else ''} after start-up "
                    f"(at least {min_steps} needed)")
        return Diagnosis(verdict, steady, startup, None, costs, headline, ())
    headline = f"{verdict} ({steady.fraction:.1%} of step time waiting for data{where})"
    if verdict == KEEPING_UP:
        return Diagnosis(verdict, steady, startup, None, costs, headline, ())
    if not costs:
        return Diagnosis(verdict, steady, startup, None, costs, headline, advice(None, facts))
    stage = blamed_stage(costs, steady, facts.num_workers)
    figure = f"{verdict} {steady.fraction:.0%} of step time{where}"
    if stage is None:
        return Diagnosis(verdict, steady, startup, None, costs, *_handoff_wait(figure, costs, steady, facts))
    headline = f"{figure}: {describe(stage, facts)}"
    step = step_seconds(steady)
    if facts.num_workers and costs[stage] <= step:  # slower than the step only with the other worker stages
        together = sum(_worker_stages(costs).values())
        headline += (f", the largest of the stages each worker runs one after another ({together * 1e3:.1f} ms "
                     f"per batch together against {step * 1e3:.1f} ms of compute per step; none alone is slower)")
    return Diagnosis(verdict, steady, startup, stage, costs, headline, advice(stage, facts))


def _handoff_wait(figure: str, costs: Mapping[str, float], steady: Phase,
                  facts: RunFacts) -> tuple[str, tuple[str, ...]]:
    """Headline and advice when the loop waits although every stage is faster than the step: the wait is not stage
    work but batches being handed over to the training process, which more workers do not shorten."""
    slowest = slowest_stage(costs)
    assert slowest is not None
    step, wait = step_seconds(steady), steady.wait_s / steady.steps
    received = costs.get("receive")
    measured = f" (unpickling them: {received * 1e3:.2f} ms per batch)" if received else ""
    headline = (f"{figure}: no loader stage is slower than the step (the slowest, {describe(slowest, facts)}, "
                f"takes {costs[slowest] * 1e3:.2f} ms per batch against {step * 1e3:.1f} ms of compute per step); "
                f"the {wait * 1e3:.2f} ms waited per step is not the workers' stage work: it goes to handing batches "
                f"over to the training process{measured}, and to workers waiting for a core when the CPU is busy")
    lines = (f"The loader's stages keep ahead of the step, so neither more workers nor faster stages remove this "
             f"wait ({wait * 1e3:.2f} ms per step, {steady.fraction:.1%} of a {(step + wait) * 1e3:.1f} ms step): "
             "taking batches in costs the training process about a millisecond for each message of batches from a "
             "worker, more when the CPU is busy. For steps this short it is expected: raise "
             "monitor(starve_threshold=...) above it.",)
    return headline, lines
