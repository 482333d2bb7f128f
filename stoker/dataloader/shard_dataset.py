"""ShardDataset: random access by index into the local shards of a packed dataset (a map-style torch Dataset).

Shards are memory-mapped on first use in each process (never pickled to workers), at most `max_open` at a time.
`__getitems__` fetches a whole batch of indices at once, grouped by shard and record batch; torch's DataLoader
(and stoker's) call it instead of `__getitem__` once per index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from stoker import storage
from stoker.dataloader.reader import OpenShard, file_identity, gather, to_samples
from stoker.dataloader.stream import column_kinds, ordered_columns
from stoker.errors import ConfigError
from stoker.formats import integrity
from stoker.lru import LRU
from stoker.formats.manifest import Manifest
from stoker.formats.shard import open_shard


class ShardDataset(Dataset):
    """Samples of a local packed dataset by global index (manifest order), as the same dicts StreamingDataset yields.

    Every sample is checked against the checksum packed with it (`checksums=False` reads unchecked).
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        columns: Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        max_open: int = 64,
        checksums: bool = True,
    ) -> None:
        self.source = os.fspath(source)
        if not storage.is_local(self.source):
            raise ConfigError(
                f"ShardDataset reads local shards; {storage.redact(self.source)} is remote: use StreamingDataset, "
                "or copy the dataset to local disk"
            )
        self.manifest = Manifest.load(self.source)
        self.checksums = bool(checksums)
        self._check = integrity.checked_columns(self.manifest.schema, self.checksums)
        if self.checksums:
            integrity.warn_unchecked(self.manifest.schema, self.source)
        self.kinds = column_kinds(self.manifest)
        self.columns = ordered_columns(self.manifest, columns)
        self.transform = transform
        self.max_open = max(1, int(max_open))
        self._offsets = self.manifest.shard_offsets
        self._open: LRU[int, OpenShard] = LRU(self.max_open, OpenShard.close)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Samples at `indices`, in that order."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not index.size:
            return []
        total = len(self)
        index = np.where(index < 0, index + total, index)
        if index.size and (index.min() < 0 or index.max() >= total):
            bad = int(np.asarray(indices).reshape(-1)[(index < 0) | (index >= total)][0])
            raise IndexError(f"index {bad} out of range for a dataset of {total} samples")
        shards = np.searchsorted(self._offsets, index, side="right") - 1
        rows = index - self._offsets[shards]
        opened = {s: self._shard(s) for s in np.unique(shards).tolist()}
        samples = to_samples(gather(opened, shards, rows, self.columns), self.kinds)
        if self.transform is None:
            return samples
        out = []
        for sample, shard in zip(samples, shards.tolist()):
            try:
                out.append(self.transform(sample))
            except Exception as exc:
                name = self.manifest.shards[shard].name
                exc.add_note(f"while transforming sample {sample.get('key')!r} from shard {name}")
                raise
        return out

    def _shard(self, shard: int) -> OpenShard:
        if self._pid != os.getpid():  # a forked worker: the parent's maps are not ours to manage
            self._open.forget()
            self._pid = os.getpid()
        name = self.manifest.shards[shard].name
        path = storage.local_path(storage.join(self.source, name))
        open_ = self._open.get(shard)
        identity = file_identity(path)
        if open_ is not None and open_.identity != identity:
            # Truncated or replaced since it was mapped: reading the old map could be SIGBUS; reopen and recheck.
            self._open.pop(shard).close()
            open_ = None
        if open_ is None:
            # Rows, token lengths and token ids are checked against the manifest: a replaced or forged shard is a
            # ShardError naming it, never an IndexError or an out-of-vocabulary id reaching the model.
            open_ = OpenShard(open_shard(path, name=name), self.columns, self.manifest.shards[shard],
                              self.manifest.rules, identity=identity, check=self._check)
            self._open.put(shard, open_)
        return open_

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = LRU(self.max_open, OpenShard.close)
        return state
