"""Length-bucketing batch samplers for `torch.utils.data.DataLoader(batch_sampler=...)`.

Both samplers shuffle the samples, sort each mega-batch by length, cut it into batches, shuffle
the batches and deal them round-robin to the ranks. The epoch's plan is a pure function of
(lengths, config, seed, epoch, world size) computed in `stoker.bucketing.plans`, so every rank
builds the same plan without talking to the others.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from stoker.bucketing import plans
from stoker.bucketing.metrics import PaddingStats, padding_stats
from stoker.checkpoint import check_checkpoint
from stoker.options import check_seed, epoch_rng, positive_int
from stoker.errors import ConfigError, StateError

STATE_VERSION = 1
DEFAULT_MEGABATCH_BATCHES = 100


def resolve_world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world size, rank): explicit arguments win, then torch.distributed, then RANK/WORLD_SIZE, else (1, 0)."""
    if num_replicas is None or rank is None:
        if dist.is_available() and dist.is_initialized():
            found_world, found_rank = dist.get_world_size(), dist.get_rank()
        else:
            found_world, found_rank = _int_env("WORLD_SIZE", 1), _int_env("RANK", 0)
        num_replicas = found_world if num_replicas is None else num_replicas
        rank = found_rank if rank is None else rank
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


class _LengthBatchSampler(Sampler[list[int]]):
    """Shared machinery: epochs, rank slicing, iteration with resume, state and stats."""

    def __init__(
        self, lengths: Any, *, shuffle: bool, seed: int, drop_last: bool, num_replicas: int | None, rank: int | None
    ) -> None:
        self.lengths = plans.validate_lengths(lengths)
        check_seed(seed)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = resolve_world(num_replicas, rank)
        self.epoch = 0
        self._resume_at = 0  # batches to skip on the next __iter__ (set by load_state_dict)
        self._consumed = 0  # batches handed out in the current epoch, resumed ones included
        self._plan_cache: tuple[int, plans.Plan] | None = None
        self._digest: str | None = None
        self._keys: np.ndarray | None = None  # sort keys, computed on first use

    # -- subclass hooks ------------------------------------------------------------------------
    def _bounds(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _trim(self, plan: plans.Plan) -> plans.Plan:
        return plan

    # -- the epoch plan ------------------------------------------------------------------------
    def _global_plan(self) -> plans.Plan:
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        rng = epoch_rng(self.seed, self.epoch, 0)
        n = len(self.lengths)
        order = plans.random_permutation(n, rng) if self.shuffle else np.arange(n, dtype=np.int64)
        if self._keys is None:
            self._keys = plans.descending_keys(self.lengths)
        order = plans.sort_within_megabatches(order, self._keys, self.megabatch)
        plan = self._trim(plans.Plan(order, *self._bounds(order)))
        if self.shuffle:
            plan = plans.shuffle_batches(plan, rng)
        plan = plans.equalise_for_ranks(plan, self.num_replicas, self.drop_last)
        if plan.repeated:
            warnings.warn(
                f"epoch {self.epoch}: {n} samples are too few for an equal number of batches on "
                f"{self.num_replicas} ranks; one sample per batch and {plan.repeated} samples repeated",
                stacklevel=4,  # _global_plan <- _rank_plan <- __iter__/__len__ <- caller
            )
        self._plan_cache = (self.epoch, plan)
        return plan

    def _rank_plan(self) -> plans.Plan:
        return self._global_plan().for_rank(self.rank, self.num_replicas)

    @property
    def dropped_samples(self) -> int:
        """Samples left out this epoch because of drop_last (all ranks together)."""
        return self._global_plan().dropped

    @property
    def repeated_samples(self) -> int:
        """Extra sample copies added this epoch to give every rank a batch (see docs/bucketing.md)."""
        return self._global_plan().repeated

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to produce; a new epoch discards any pending resume point."""
        if epoch != self.epoch:
            self._resume_at = 0
            self._consumed = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._rank_plan().num_batches

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator itself: the counters reset when iteration starts, not at the first next().
        plan = self._rank_plan()
        start, self._resume_at = self._resume_at, 0
        self._consumed = start
        return self._batches(plan, start)

    def _batches(self, plan: plans.Plan, start: int) -> Iterator[list[int]]:
        for s, e in zip(plan.starts[start:].tolist(), plan.ends[start:].tolist()):
            self._consumed += 1
            yield plan.order[s:e].tolist()

    # -- checkpointing -------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        if self._digest is None:
            self._digest = hashlib.blake2b(memoryview(self.lengths), digest_size=16).hexdigest()
        base = {
            "sampler": type(self).__name__,
            "num_samples": len(self.lengths),
            "lengths_digest": self._digest,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "megabatch": self.megabatch,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }
        return {**base, **self._settings()}

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Position to resume from: {version, config, epoch, batches_consumed}.

        The sampler counts batches it has handed out; a DataLoader with workers pulls batches
        ahead of training, so pass the number of batches actually trained on this epoch.
        The state is the same on every rank (all ranks consume equally); `rank` is not part of it.
        """
        consumed = self._consumed if batches_consumed is None else int(batches_consumed)
        return {"version": STATE_VERSION, "config": self._config(), "epoch": self.epoch, "batches_consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next iteration yields the rest of that epoch, exactly."""
        check_checkpoint(state, what="sampler", keys={"version", "config", "epoch", "batches_consumed"},
                         version=STATE_VERSION, config=self._config(), settings="the lengths and sampler settings")
        self.set_epoch(int(state["epoch"]))
        consumed = int(state["batches_consumed"])
        available = len(self)
        if not 0 <= consumed <= available:
            raise StateError(f"batches_consumed={consumed} is outside [0, {available}] for epoch {self.epoch}")
        self._resume_at = self._consumed = consumed

    # -- metrics -------------------------------------------------------------------------------
    def padding_stats(self, pad_to_multiple_of: int | None = None) -> PaddingStats:
        """Padding of this rank's batches this epoch, computed from lengths alone."""
        multiple = self._pad_multiple if pad_to_multiple_of is None else pad_to_multiple_of
        plan = self._rank_plan()
        flat = self.lengths[plan.order[plans.batch_positions(plan.starts, plan.ends)]]
        offsets = np.concatenate([[0], np.cumsum(plan.ends - plan.starts)])
        return padding_stats(flat, offsets, multiple)


class BucketBatchSampler(_LengthBatchSampler):
    """Fixed-size batches of similar-length samples (mega-batch sorting).

    `megabatch` samples (a multiple of batch_size, default 100 batches) are sorted together; a
    larger megabatch means less padding but batches whose lengths are less random.
    drop_last drops the one short batch of the epoch and the batches that do not divide evenly
    among ranks; otherwise nothing is dropped (see `order.equalise_for_ranks`).
    """

    _pad_multiple = 1

    def __init__(
        self,
        lengths: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        megabatch: int | None = None,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(lengths, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        positive_int("batch_size", batch_size)
        self.batch_size = int(batch_size)
        megabatch = DEFAULT_MEGABATCH_BATCHES * self.batch_size if megabatch is None else megabatch
        positive_int("megabatch", megabatch)
        self.megabatch = int(megabatch)
        if self.megabatch % self.batch_size:
            raise ConfigError(f"megabatch={self.megabatch} must be a multiple of batch_size={self.batch_size}")

    def _bounds(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return plans.fixed_size_bounds(len(order), self.batch_size)

    def _trim(self, plan: plans.Plan) -> plans.Plan:
        # Only the last batch can be short: megabatches are whole multiples of batch_size.
        short = int(plan.ends[-1] - plan.starts[-1])
        if self.drop_last and short < self.batch_size:
            return plans.Plan(plan.order, plan.starts[:-1], plan.ends[:-1], dropped=short)
        return plan

    def _settings(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}


class TokenBudgetBatchSampler(_LengthBatchSampler):
    """Variable-size batches with rows x padded length <= max_tokens.

    The padded length is the batch's longest sample rounded up to `pad_to_multiple_of`, as
    `pad_collate` pads it. `megabatch` (samples sorted together) defaults to about 100 batches'
    worth of samples. A sample that alone exceeds the budget raises ConfigError naming it.
    """

    def __init__(
        self,
        lengths: Any,
        max_tokens: int,
        *,
        pad_to_multiple_of: int = 8,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        megabatch: int | None = None,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(lengths, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        positive_int("max_tokens", max_tokens)
        positive_int("pad_to_multiple_of", pad_to_multiple_of)
        positive_int("max_batch_size", max_batch_size, allow_none=True)
        self.max_tokens = int(max_tokens)
        self.pad_to_multiple_of = self._pad_multiple = int(pad_to_multiple_of)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        # The longest length that still fits once padded; every sample must fit in a batch of one.
        fits = self.max_tokens // self.pad_to_multiple_of * self.pad_to_multiple_of
        too_long = np.flatnonzero(self.lengths > fits)
        if too_long.size:
            first = int(too_long[0])
            length = int(self.lengths[first])
            raise ConfigError(
                f"sample {first} has length {length} (padded to {plans.round_up(length, self.pad_to_multiple_of)}), "
                f"more than max_tokens={self.max_tokens} ({too_long.size} samples are too long): "
                "raise max_tokens or truncate/filter long samples"
            )
        if megabatch is None:
            per_batch = self.max_tokens / float(self.lengths.mean())
            if self.max_batch_size is not None:
                per_batch = min(per_batch, self.max_batch_size)
            megabatch = max(1, round(DEFAULT_MEGABATCH_BATCHES * per_batch))
        positive_int("megabatch", megabatch)
        self.megabatch = int(megabatch)

    def _bounds(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        budget = plans.TokenBudget(self.max_tokens, self.pad_to_multiple_of, self.max_batch_size)
        return plans.token_budget_bounds(order, self.lengths, self.megabatch, budget)

    def _settings(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "max_batch_size": self.max_batch_size,
        }
