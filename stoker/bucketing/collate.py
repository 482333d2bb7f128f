"""Collate functions that turn a list of token samples into model-ready int64 tensors.

`pad_collate` pads each sample to the batch's longest (rounded up); `pack_collate` concatenates
documents into fixed-length rows, either keeping documents apart ("documents": position ids
restart and `cu_seqlens` marks every boundary, flash-attn varlen style) or as one token stream
cut into blocks ("blocks", LitData TokensLoader style). Tokens are copied with whole-array numpy
operations; the only per-sample Python is reading each sample's array and, when packing,
placing each document in a row.

A sample is a dict with a 1-D `tokens` array (and optionally `length`, checked against it), or
a bare 1-D array / list of token ids.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stoker.bucketing.metrics import BatchStats
from stoker.errors import ConfigError
from stoker.options import positive_int

IGNORE_INDEX = -100  # label value torch.nn.CrossEntropyLoss skips by default


def _describe(sample: object, position: int) -> str:
    name = f"sample {position} of the batch"
    if isinstance(sample, Mapping):
        for key in ("key", "index"):
            if key in sample:
                return f"{name} ({key} {sample[key]!r})"
    return name


def read_tokens(samples: Sequence[object]) -> tuple[list[np.ndarray], np.ndarray]:
    """The token arrays of `samples` and their lengths; checks each stored `length` against its tokens."""
    if len(samples) == 0:
        raise ConfigError("cannot collate an empty batch")
    arrays = []
    for position, sample in enumerate(samples):
        tokens = np.asarray(sample["tokens"] if isinstance(sample, Mapping) else sample)
        if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
            raise ConfigError(
                f"{_describe(sample, position)}: tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}"
            )
        if isinstance(sample, Mapping) and "length" in sample and int(sample["length"]) != len(tokens):
            raise ConfigError(
                f"{_describe(sample, position)}: 'length' is {int(sample['length'])} but it holds {len(tokens)} tokens"
            )
        arrays.append(tokens)
    lengths = np.fromiter((len(t) for t in arrays), dtype=np.int64, count=len(arrays))
    return arrays, lengths


@dataclass(frozen=True)
class PadCollate:
    """Callable built by `pad_collate`; `stats` accumulates padding totals in this process."""

    pad_id: int = 0
    pad_to_multiple_of: int = 8
    max_length: int | None = None
    stats: BatchStats = field(default_factory=BatchStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive_int("pad_to_multiple_of", self.pad_to_multiple_of, allow_none=True)
        positive_int("max_length", self.max_length, allow_none=True)

    def __call__(self, samples: Sequence[object]) -> dict[str, torch.Tensor]:
        arrays, lengths = read_tokens(samples)
        empty = np.flatnonzero(lengths == 0)
        if empty.size:
            i = int(empty[0])
            raise ConfigError(f"{_describe(samples[i], i)} has no tokens: a fully padded row has nothing to attend to")
        if self.max_length is not None and lengths.max() > self.max_length:
            arrays = [t[: self.max_length] for t in arrays]
            lengths = np.minimum(lengths, self.max_length)
        width = -(-int(lengths.max()) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            width = min(width, self.max_length)
        input_ids = np.full((len(arrays), width), self.pad_id, dtype=np.int64)
        mask = np.arange(width) < lengths[:, None]
        input_ids[mask] = np.concatenate(arrays)  # row-major mask order == concatenation order
        self.stats.add(len(arrays), width, int(lengths.sum()))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "lengths": torch.from_numpy(lengths),
        }


def pad_collate(pad_id: int = 0, pad_to_multiple_of: int = 8, max_length: int | None = None) -> PadCollate:
    """Collate to {"input_ids" [B, L] int64, "attention_mask" [B, L] int64, "lengths" [B] int64}.

    L is the longest sample rounded up to `pad_to_multiple_of`; samples longer than `max_length`
    are truncated to it (and L never exceeds it). Empty samples raise ConfigError.
    """
    return PadCollate(pad_id, pad_to_multiple_of, max_length)


def best_fit_rows(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best-fit-decreasing placement of items (each <= capacity) into rows.

    Returns (row, offset) per item and the used length of every row; items in a row are laid
    out in placement order, so a row is filled contiguously from offset 0.
    """
    row = np.empty(len(sizes), dtype=np.int64)
    offset = np.empty(len(sizes), dtype=np.int64)
    used: list[int] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest fit
    for item in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[item])
        j = bisect.bisect_left(free, (size, -1))
        if j == len(free):
            r = len(used)
            used.append(0)
        else:
            r = free.pop(j)[1]
        row[item], offset[item] = r, used[r]
        used[r] += size
        if used[r] < capacity:
            bisect.insort(free, (capacity - used[r], r))
    return row, offset, np.asarray(used, dtype=np.int64)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    offsets = np.cumsum(sizes) - sizes
    return np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


@dataclass(frozen=True)
class PackCollate:
    """Callable built by `pack_collate`; `stats` accumulates packing totals in this process."""

    seq_len: int
    pad_id: int = 0
    mode: str = "documents"
    eos_id: int | None = None
    overflow: str | None = None
    stats: BatchStats = field(default_factory=BatchStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive_int("seq_len", self.seq_len, allow_none=True)
        if self.mode not in ("documents", "blocks"):
            raise ConfigError(f"mode must be 'documents' or 'blocks', got {self.mode!r}")
        if self.mode == "blocks" and self.eos_id is None:
            raise ConfigError("mode='blocks' needs eos_id: it separates documents in the token stream")
        if self.mode == "blocks" and self.overflow is not None:
            raise ConfigError("overflow applies to mode='documents' only; blocks mode cuts the stream anywhere")
        if self.overflow not in (None, "split", "truncate"):
            raise ConfigError(f"overflow must be 'split' or 'truncate', got {self.overflow!r}")

    def __call__(self, samples: Sequence[object]) -> dict[str, torch.Tensor | int]:
        arrays, lengths = read_tokens(samples)
        keep = lengths > 0  # an empty document contributes nothing, not even an EOS
        if not keep.any():
            raise ConfigError(f"all {len(arrays)} documents of the batch are empty: nothing to pack")
        stream = np.concatenate([a for a, k in zip(arrays, keep.tolist()) if k]).astype(np.int64)
        lengths = lengths[keep]
        if self.eos_id is not None:
            stream = np.insert(stream, np.cumsum(lengths), self.eos_id)
            lengths = lengths + 1
        if self.mode == "blocks":
            return self._blocks(stream)
        return self._documents(stream, lengths)

    def _blocks(self, stream: np.ndarray) -> dict[str, torch.Tensor | int]:
        seq_len, n = self.seq_len, len(stream)
        rows = max(1, -(-(n - 1) // seq_len))  # row r predicts stream[r*S + 1 : (r+1)*S + 1]
        padded = np.full(rows * seq_len + 1, self.pad_id, dtype=np.int64)
        padded[:n] = stream
        flat_index = np.arange(rows * seq_len)
        labels = np.where(flat_index + 1 < n, padded[1:], IGNORE_INDEX)
        mask = flat_index < n
        self.stats.add(rows, seq_len, int(mask.sum()))
        return {
            "input_ids": torch.from_numpy(padded[:-1].reshape(rows, seq_len)),
            "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
            "attention_mask": torch.from_numpy(mask.reshape(rows, seq_len).astype(np.int64)),
        }

    def _documents(self, stream: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor | int]:
        seq_len = self.seq_len
        doc_start = np.cumsum(lengths) - lengths
        # Cut documents longer than seq_len into seq_len pieces; "truncate" keeps only the first.
        pieces = np.ones_like(lengths) if self.overflow == "truncate" else -(-lengths // seq_len)
        doc = np.repeat(np.arange(len(lengths)), pieces)
        part = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        piece_start = doc_start[doc] + part * seq_len
        piece_len = np.minimum(seq_len, lengths[doc] - part * seq_len)

        row, offset, used = best_fit_rows(piece_len, seq_len)
        rows, slots = len(used), len(used) * seq_len
        input_ids = np.full(slots, self.pad_id, dtype=np.int64)
        input_ids[_ranges(row * seq_len + offset, piece_len)] = stream[_ranges(piece_start, piece_len)]

        # Segments: every piece, plus the padding tail of each row as a segment of its own, so
        # that cu_seqlens covers input_ids.view(-1) exactly and nothing attends across a boundary.
        boundary = np.zeros(slots + 1, dtype=bool)
        boundary[row * seq_len + offset] = True
        boundary[np.arange(rows) * seq_len + used] = True  # padding tail start (or next row start)
        boundary[::seq_len] = True
        boundary = boundary[:-1]
        index = np.arange(slots)
        position_ids = index - np.maximum.accumulate(np.where(boundary, index, 0))
        real = (np.arange(seq_len) < used[:, None]).ravel()
        labels = np.full(slots, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(~boundary[1:] & real[:-1], input_ids[1:], IGNORE_INDEX)
        cu_seqlens = np.append(np.flatnonzero(boundary), slots).astype(np.int32)
        self.stats.add(rows, seq_len, int(used.sum()))
        return {
            "input_ids": torch.from_numpy(input_ids.reshape(rows, seq_len)),
            "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
            "attention_mask": torch.from_numpy(real.reshape(rows, seq_len).astype(np.int64)),
            "position_ids": torch.from_numpy(position_ids.reshape(rows, seq_len)),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(np.diff(cu_seqlens).max()),
        }


def pack_collate(
    seq_len: int, *, pad_id: int = 0, mode: str = "documents", eos_id: int | None = None, overflow: str | None = None
) -> PackCollate:
    """Collate documents into rows of `seq_len` tokens.

    mode="documents": whole documents are placed best-fit-decreasing into rows; a document
    longer than seq_len is cut into seq_len pieces, each packed as a document of its own
    (overflow="truncate" keeps only its first piece). Returns input_ids, labels (next token
    within the document, -100 elsewhere), attention_mask (1 = real token), position_ids
    (restart at 0 at every document and padding run), cu_seqlens (int32 boundaries over
    input_ids.view(-1), padding runs included) and max_seqlen (int).
    mode="blocks": documents are joined with `eos_id` into one stream cut into rows of seq_len
    whose labels are the following token (so windows are seq_len + 1 long and overlap by one);
    attention crosses documents. The last row is padded. Returns input_ids, labels, attention_mask.
    With `eos_id` set, "documents" mode also appends it to every document. Empty documents are skipped.
    """
    return PackCollate(seq_len, pad_id, mode, eos_id, overflow)
