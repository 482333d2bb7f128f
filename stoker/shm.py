"""Shared memory for what crosses from a DataLoader worker to the training process (below `dataloader` and
`augment`, which both build batches there)."""

from __future__ import annotations

import torch


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` allocated in shared memory directly, as default_collate does in workers: sending
    it to another process passes its file descriptor instead of copying it into shared memory first."""
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)
