"""Seeded single-byte flips anywhere in real shards and in the manifest: each is an error naming the damaged file,
or provably harmless (every sample still comes back exactly as packed); never a silently changed sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stoker.errors import StokerError
from stoker.formats.manifest import MANIFEST_NAME, Manifest

from stoker.synthetic import make_dataset
from _forge import read_both

TRIALS = 150  # per target; about a second each on one core


def _same(a: tuple[list[dict], list[dict]], b: tuple[list[dict], list[dict]]) -> bool:
    return all(len(x) == len(y) and all(s.keys() == t.keys() and all(s[k] == t[k] for k in s) for s, t in zip(x, y))
               for x, y in zip(a, b))


def _fuzz(root: Path, target: str, trials: int, seed: int) -> dict[str, int]:
    """Outcomes of `trials` seeded flips of `target`; also asserts they reached both ends of the file, so that its
    header and its footer (the parts a reader trusts first) were damaged too, not only the samples between."""
    expected = read_both(root)
    path = root / target
    original = path.read_bytes()
    rng = np.random.default_rng(seed)
    counts = {"error": 0, "harmless": 0}
    flipped = set()
    for _ in range(trials):
        data = bytearray(original)
        at = int(rng.integers(len(data)))
        flipped.add(at)
        data[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            got = read_both(root)
        except StokerError as exc:
            # The error names the file that was damaged (a shard, or the manifest).
            assert target in str(exc), f"byte {at} of {target}: {type(exc).__name__} does not name it: {exc}"
            counts["error"] += 1
        else:
            assert _same(got, expected), f"byte {at} of {target} changed a sample without an error"
            counts["harmless"] += 1
    path.write_bytes(original)
    tenth = len(original) // 10
    assert min(flipped) < tenth and max(flipped) >= len(original) - tenth, f"flips of {target} missed an end"
    return counts


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_single_byte_flips_in_shards_are_errors_or_harmless(tmp_path: Path, fmt: str) -> None:
    root = Path(make_dataset(tmp_path / "d", rows=(12, 12), fmt=fmt, payload=(20, 120)))
    counts = _fuzz(root, Manifest.load(str(root)).shards[1].name, TRIALS, seed=7)
    print(f"{fmt} shard flips: {counts}")
    assert counts["error"] > TRIALS // 2


def test_single_byte_flips_in_the_manifest_are_errors_or_harmless(tmp_path: Path) -> None:
    root = Path(make_dataset(tmp_path / "d", rows=(6, 6), payload=(20, 60)))
    counts = _fuzz(root, MANIFEST_NAME, TRIALS, seed=11)
    print(f"manifest flips: {counts}")
    assert counts["error"] > TRIALS // 2
