"""stoker: keep accelerators fed.

Public entry points are imported lazily, so `pack-dataset` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; written out by hand so readers and type checkers can follow it.
_EXPORTS = {
    "BucketBatchSampler": "stoker.bucketing.samplers",
    "BucketedStream": "stoker.bucketing.bucketed",
    "DataLoader": "stoker.dataloader.loader",
    "Manifest": "stoker.formats.manifest",
    "ReadOptions": "stoker.dataloader.reader",
    "ShardDataset": "stoker.dataloader.shard_dataset",
    "StreamingDataset": "stoker.dataloader.stream",
    "TokenBudgetBatchSampler": "stoker.bucketing.samplers",
    "TransformSpec": "stoker.augment.spec",
    "build_transform": "stoker.augment.registry",
    "monitor": "stoker.perf.monitor",
    "open_shard": "stoker.formats.shard",
    "pack_collate": "stoker.bucketing.collate",
    "pack_dataset": "stoker.formats.pack",
    "pad_collate": "stoker.bucketing.collate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stoker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from stoker.augment.registry import build_transform
    from stoker.augment.spec import TransformSpec
    from stoker.bucketing.bucketed import BucketedStream
    from stoker.bucketing.collate import pack_collate, pad_collate
    from stoker.bucketing.samplers import BucketBatchSampler, TokenBudgetBatchSampler
    from stoker.dataloader.loader import DataLoader
    from stoker.dataloader.reader import ReadOptions
    from stoker.dataloader.shard_dataset import ShardDataset
    from stoker.dataloader.stream import StreamingDataset
    from stoker.formats.manifest import Manifest
    from stoker.formats.pack import pack_dataset
    from stoker.formats.shard import open_shard
    from stoker.perf.monitor import monitor
