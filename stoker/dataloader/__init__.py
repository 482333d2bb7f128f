"""Reading packed datasets into training: StreamingDataset, ShardDataset, DataLoader (see docs/dataloader.md).

Names are imported on first use, so importing this package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataLoader": "stoker.dataloader.loader",
    "ReadOptions": "stoker.dataloader.reader",
    "ShardDataset": "stoker.dataloader.shard_dataset",
    "StreamingDataset": "stoker.dataloader.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stoker.dataloader' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
