"""The checks every options object of stoker shares: sizes, counts, seeds, and the cores this process may use.

Errors name the parameter as the Python API spells it (`memory_budget`, `shard_size`); the command line maps its
own flags onto the same checks.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from stoker.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(value: str | int, what: str = "size") -> int:
    """`4GB`, `512MB`, `1.5 GiB`, `256k`, `1048576` -> bytes (binary units: 1 GB = 2**30 bytes); positive."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise ConfigError(f"{what} must be bytes (int) or a string such as '4GB', got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} {value!r} is not a size such as '4GB', '512MB' or 1048576")
        nbytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        nbytes = int(value)
    if nbytes <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return nbytes


def positive_int(what: str, value: Any, *, allow_none: bool = False) -> int | None:
    """`value` as an int >= 1 (or None when allowed), else a ConfigError naming `what`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` (or an epoch) as a non-negative int, else a ConfigError naming `what`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def epoch_rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    """The random generator for (seed, epoch, keys...); the same inputs give the same stream on every machine."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *keys]))


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask; all cores where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
