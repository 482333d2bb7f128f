"""Random mutations of real shards: every outcome is valid samples or a stoker error, never a crash or hang."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stoker.errors import StokerError
from stoker.formats.manifest import Manifest
from stoker.formats.shard import batch_to_samples, open_shard

CASES = 300
BUDGET_S = 20.0


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip a few random bytes
        for pos in rng.integers(0, len(out), int(rng.integers(1, 8))):
            out[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        del out[int(rng.integers(0, len(out))):]
    elif kind == 2:  # overwrite 8 bytes with a huge little-endian integer (forged lengths and offsets)
        pos = int(rng.integers(0, max(1, len(out) - 8)))
        out[pos:pos + 8] = int(rng.integers(1 << 40, 1 << 62)).to_bytes(8, "little")
    else:  # splice a chunk from elsewhere
        a, b = sorted(int(x) for x in rng.integers(0, len(out), 2))
        out[a:a] = out[b:b + int(rng.integers(1, 64))]
    return bytes(out)


def _read_everything(data: bytes) -> int:
    rows = 0
    with open_shard(data, name="fuzzed") as reader:
        for batch in reader.iter_batches():
            rows += len(batch_to_samples(batch))
        if reader.num_rows:
            reader.take([reader.num_rows - 1, 0])
    return rows


@pytest.mark.slow
def test_mutated_shards_give_samples_or_stoker_errors(packed_text: Path, packed_images: Path) -> None:
    rng = np.random.default_rng(1234)
    originals = []
    for dataset in (packed_text, packed_images):
        info = Manifest.load(str(dataset)).shards[0]
        originals.append((dataset / info.name).read_bytes())
    outcomes = {"ok": 0, "error": 0}
    deadline = time.monotonic() + BUDGET_S
    for case in range(CASES):
        if time.monotonic() > deadline:
            break
        data = _mutate(originals[case % 2], rng)
        try:
            _read_everything(data)
            outcomes["ok"] += 1
        except (StokerError, IndexError) as exc:
            assert isinstance(exc, StokerError), f"case {case}: {type(exc).__name__}: {exc}"
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and sum(outcomes.values()) >= 50, outcomes
