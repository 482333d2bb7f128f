"""The skip policy on read: a damaged sample is dropped, warned about (shard, row, key) and counted, and a resumed
run skips it again instead of handing out another sample in its place."""

from __future__ import annotations

import gc
import re
import warnings
from pathlib import Path

import pytest

import stoker
from stoker import StreamingDataset
from stoker.dataloader.reader import ReadOptions
from stoker.errors import ChecksumError, ConfigError, SkippedSampleWarning
from stoker.formats.manifest import Manifest

from stoker.synthetic import make_dataset
from _forge import flip_sample_byte

SKIP = ReadOptions(on_error="skip")
DAMAGED = "000027"  # row 7 of shard 1


def _damaged(tmp_path: Path, fmt: str = "arrow") -> Path:
    """Two shards of 20 samples; one bit of sample 000027's image bytes flipped on disk."""
    root = Path(make_dataset(tmp_path / "d", rows=(20, 20), fmt=fmt))
    flip_sample_byte(root / Manifest.load(str(root)).shards[1].name, DAMAGED, 3)
    return root


def _keys(batches) -> list[str]:
    return [k for b in batches for k in (b["key"] if isinstance(b, dict) else [s["key"] for s in b])]


def _error_from_workers(root: Path) -> str:
    try:
        list(stoker.DataLoader(StreamingDataset(str(root), shuffle=False), batch_size=8, num_workers=2))
    except ChecksumError as exc:
        return str(exc)
    finally:
        # The error's traceback holds the loader's frames (and the batches they received) in a reference cycle:
        # collect it, so that those batches hand their shared memory back now, as later tests expect.
        gc.collect()
    return ""


def test_on_error_is_raise_or_skip() -> None:
    with pytest.raises(ConfigError, match="on_error"):
        ReadOptions(on_error="ignore")


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_skip_drops_warns_and_counts_the_damaged_sample_only(tmp_path: Path, fmt: str) -> None:
    root = _damaged(tmp_path, fmt)
    everything = [f"{i:06d}" for i in range(40) if i != 27]
    ds = StreamingDataset(str(root), shuffle=False, read=SKIP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [s["key"] for s in ds] == everything
    skipped = [w for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert len(skipped) == 1 and ds.skipped == 1
    message = str(skipped[0].message)
    assert "shard-00001" in message and "row 7" in message and repr(DAMAGED) in message

    # Raise (the default) with workers; skip with workers, columnar batches and a user's collate_fn.
    assert re.search(r"shard-00001.*row 7.*'000027'", _error_from_workers(root))
    for collate_fn, workers in ((None, 2), (list, 2), (None, 1)):  # one worker: batches 3 and 4 in one message
        loader = stoker.DataLoader(StreamingDataset(str(root), shuffle=False, read=SKIP), batch_size=8,
                                   num_workers=workers, collate_fn=collate_fn)
        batches = list(loader)
        assert sorted(_keys(batches)) == everything
        # The batch that held the damaged sample is one short; the others keep their size and place.
        sizes = [len(b["key"]) if isinstance(b, dict) else len(b) for b in batches]
        assert sizes == [8, 8, 8, 7, 8] and loader.skipped == 1
    # Every other sample is exactly as packed: the same bytes as an unchecked read of the damaged dataset.
    unchecked = {s["key"]: s["image"] for s in StreamingDataset(str(root), shuffle=False,
                                                                read=ReadOptions(checksums=False))}
    checked = {b["key"][i]: bytes(b["image"][i]) for b in stoker.DataLoader(
        StreamingDataset(str(root), shuffle=False, read=SKIP), batch_size=8, num_workers=0)
        for i in range(len(b["key"]))}
    assert checked == {k: v for k, v in unchecked.items() if k != DAMAGED}


def test_a_resumed_loader_skips_the_damaged_sample_again(tmp_path: Path) -> None:
    root = _damaged(tmp_path)

    def loader() -> stoker.DataLoader:
        ds = StreamingDataset(str(root), seed=3, shuffle_buffer=16, read=SKIP)
        return stoker.DataLoader(ds, batch_size=4, num_workers=2)

    full = list(loader())
    order = _keys(full)
    assert len(order) == 39 and DAMAGED not in order
    at = next(i for i, b in enumerate(full) if len(b["key"]) == 3)  # the batch the damaged sample was dropped from
    for stop in (at, at + 1):  # checkpoints just before and just after that batch
        first = loader()
        it = iter(first)
        head = [next(it) for _ in range(stop)]
        state = first.state_dict()
        del it
        second = loader()
        second.load_state_dict(state)
        rest = list(second)
        assert _keys(head) + _keys(rest) == order  # the same samples in the same order, none in its place
        assert [len(b["key"]) for b in head + rest] == [len(b["key"]) for b in full]
        assert second.skipped == (1 if stop == at else 0)


def test_a_resumed_dataset_skips_the_damaged_sample_again(tmp_path: Path) -> None:
    root = _damaged(tmp_path)
    order = [s["key"] for s in StreamingDataset(str(root), seed=5, shuffle_buffer=16, read=SKIP)]
    at = [f"{i:06d}" for i in range(40) if f"{i:06d}" not in order]
    assert at == [DAMAGED]
    for stop in range(39):
        ds = StreamingDataset(str(root), seed=5, shuffle_buffer=16, read=SKIP)
        it = iter(ds)
        head = [next(it)["key"] for _ in range(stop)]
        state = ds.state_dict()
        again = StreamingDataset(str(root), seed=5, shuffle_buffer=16, read=SKIP)
        again.load_state_dict(state)
        assert head + [s["key"] for s in again] == order, stop
