"""`pack-dataset --engine ray`: the same per-shard jobs as the local process pool, run as Ray tasks.

The driver plans exactly as a local run does (same listing, same deterministic shard plan, same fingerprints),
then submits one task per unfinished shard. Each task runs the `pack_shard` it is given (`pack.pack_shard`; this
module does not import `pack`, which imports it): it writes the shard under a hidden
temporary name (or in a worker-local staging folder when DST is a URL), publishes it with one rename or one PUT,
then writes its resume record. So a task killed mid-shard leaves nothing a reader can see; Ray reruns it
(`max_retries`) and the rerun writes the complete shard. The driver writes the manifest last, as locally.

Where the work runs: with no address, a Ray instance is started on this machine with `workers` CPUs (or all
cores); with `--ray-address auto` (or ray://host:port) the tasks go to that cluster, whose nodes must have stoker
installed and must reach SRC and DST: an fsspec URL, or a path on a filesystem all nodes share.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from stoker import storage
from stoker.errors import MissingExtraError, StokerError

if TYPE_CHECKING:
    from stoker.formats.pack import PackJob, PackOptions

PackShard = Callable[["PackJob"], dict[str, Any]]

_WAIT_S = 0.5  # how often the progress bar refreshes while no task finishes


def import_ray() -> Any:
    """The `ray` module, or MissingExtraError naming the `ray` extra."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("packing with engine='ray'", "ray", "ray[default]") from None
    return ray


def pack_shard_task(job: PackJob, pack_shard: PackShard) -> dict[str, Any]:
    """Pack one shard on a Ray worker; for a remote DST, stage it in this node's own temporary folder."""
    if storage.is_local(job.dst):
        return pack_shard(job)  # staged beside DST (a shared filesystem on a cluster), published by rename
    # The driver's staging folder may be on another node; each task stages locally and uploads in one PUT.
    stage = tempfile.mkdtemp(prefix="stoker-ray-pack-")
    try:
        return pack_shard(replace(job, stage_dir=stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def connect(opts: PackOptions) -> bool:
    """Join the cluster at `opts.ray_address`, or start a local Ray instance; True if this call started Ray."""
    ray = import_ray()
    if ray.is_initialized():
        return False  # the caller (a notebook, a test, a larger Ray program) owns the connection
    if opts.ray_address:
        ray.init(address=opts.ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=opts.workers or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _result(ray: Any, ref: Any, job: PackJob, opts: PackOptions) -> dict[str, Any]:
    """The task's record; its own error (e.g. a SourceError naming the file) is raised as such, not wrapped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, StokerError):
            raise cause from None
        raise StokerError(f"shard {job.name}: Ray task failed: {cause!r}") from exc
    except ray.exceptions.RayError as exc:
        raise StokerError(
            f"shard {job.name}: Ray task failed after {opts.max_retries} retries ({type(exc).__name__}); "
            "rerun the same command to resume"
        ) from exc


def run_jobs(jobs: list[PackJob], opts: PackOptions, total: int | None,
             pack_shard: PackShard) -> dict[int, dict[str, Any]]:
    """Run `pack_shard(job)` for each job as a Ray task with retries; a progress bar advances as tasks finish.
    Returns {index: record}."""
    from tqdm import tqdm

    ray = import_ray()
    started = connect(opts)
    bar = tqdm(total=total, unit="sample", disable=not opts.progress or not jobs, dynamic_ncols=True)
    results: dict[int, dict[str, Any]] = {}
    pending: dict[Any, PackJob] = {}
    try:
        # Worker death is retried by Ray itself; I/O errors (OSError: a storage hiccup) are retried too.
        # A SourceError is a bad input, the same on every try, so it fails at once.
        task = ray.remote(pack_shard_task).options(num_cpus=1, max_retries=opts.max_retries, retry_exceptions=[OSError])
        pending = {task.remote(job, pack_shard): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_WAIT_S)
            for ref in done:
                job = pending.pop(ref)
                record = _result(ray, ref, job, opts)
                results[job.index] = record
                bar.update(len(job.units) if total is not None else record["shard"]["rows"])
            bar.set_postfix_str(f"{len(results)}/{len(jobs)} shards", refresh=False)
            bar.refresh()
        return results
    except BaseException:
        for ref in pending:  # finished shards keep their records, so a rerun resumes from here
            ray.cancel(ref)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
