"""Checkpoints of a stream: {version, config, epoch, consumed}, and the check that a checkpoint fits the stream.

`consumed` counts the positions of the epoch's global order (see `stoker.dataloader.order`) that were delivered over
all ranks, so a checkpoint does not depend on the world size, the number of workers or the batch size. `config`
holds what the order does depend on; loading a checkpoint made under another configuration raises a StateError
naming every key that differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from stoker.checkpoint import check_checkpoint
from stoker.errors import StateError
from stoker.formats.manifest import Manifest

STATE_VERSION = 1


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short hash of the shards (names, rows, checksums): changes whenever the dataset's content does."""
    digest = hashlib.sha256()
    for shard in manifest.shards:
        digest.update(f"{shard.name}\0{shard.rows}\0{shard.sha256}\n".encode())
    return digest.hexdigest()[:16]


def stream_config(manifest: Manifest, *, seed: int, shuffle: bool, shuffle_buffer: int) -> dict[str, Any]:
    """Everything the epoch order depends on, as a plain dict saved in checkpoints."""
    return {
        "dataset": dataset_fingerprint(manifest),
        "num_samples": manifest.num_samples,
        "seed": seed,
        "shuffle": shuffle,
        "shuffle_buffer": shuffle_buffer if shuffle else None,
    }


def make_state(config: dict[str, Any], epoch: int, consumed: int) -> dict[str, Any]:
    """A checkpoint: plain ints and strings, safe for torch.save and JSON."""
    return {"version": STATE_VERSION, "config": dict(config), "epoch": int(epoch), "consumed": int(consumed)}


def read_state(state: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    """(epoch, consumed) of a checkpoint, after checking that it was made under `config`."""
    check_checkpoint(state, what="stream", keys={"version", "config", "epoch", "consumed"}, version=STATE_VERSION,
                     config=config, settings="the dataset and shuffle settings")
    epoch, consumed = int(state["epoch"]), int(state["consumed"])
    if epoch < 0 or not 0 <= consumed <= int(config["num_samples"]):
        raise StateError(f"checkpoint has epoch {epoch} and consumed {consumed}, outside this dataset's range")
    return epoch, consumed


class StreamPosition:
    """Where a stream's next pass starts: [epoch, start, epoch start] in shared memory, so that persistent workers
    see `set_epoch` and resumes too. `start` moves past `epoch start` only when a loader re-deals the rest of an
    epoch to new workers (`continue_at`); a later pass of that epoch starts over from `epoch start` (`rewind`)."""

    def __init__(self) -> None:
        self._values = torch.zeros(3, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._values[0])

    @property
    def start(self) -> int:
        """The order position the next pass (or the re-dealt workers) start from."""
        return int(self._values[1])

    @property
    def epoch_start(self) -> int:
        """The order position the current epoch's pass started from (a resume's position, else 0)."""
        return int(self._values[2])

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts from its beginning; the same epoch keeps a pending resume."""
        if epoch != self.epoch:
            self._values[0], self._values[1], self._values[2] = epoch, 0, 0

    def resume_at(self, epoch: int, consumed: int) -> None:
        """The next pass delivers `epoch` from order position `consumed`."""
        self._values[0], self._values[1], self._values[2] = epoch, consumed, consumed

    def continue_at(self, consumed: int) -> None:
        """Workers started now deliver the current epoch from `consumed` (a re-deal); its start stays."""
        self._values[1] = consumed

    def rewind(self) -> None:
        """A new pass over the current epoch starts where the epoch started (undoing an abandoned re-deal)."""
        self._values[1] = self._values[2]
