"""Padding statistics, batch accumulation and the text length histogram."""

from __future__ import annotations

import numpy as np
import pytest

from stoker.bucketing.collate import pack_collate
from stoker.bucketing.metrics import BatchStats, length_histogram, padding_stats, render_histogram
from stoker.errors import ConfigError


def test_padding_stats_by_hand():
    stats = padding_stats(np.array([3, 5, 2]), np.array([0, 2, 3]), pad_to_multiple_of=4)
    # batch 0: 2 rows x 8, batch 1: 1 row x 4
    assert (stats.batches, stats.rows, stats.real_tokens, stats.total_tokens) == (2, 3, 10, 20)
    assert stats.padding_fraction == pytest.approx(0.5) and stats.efficiency == pytest.approx(0.5)
    assert stats.shapes == {(2, 8): 1, (1, 4): 1}
    assert padding_stats(np.array([], dtype=np.int64), np.array([0])).efficiency == 1.0
    with pytest.raises(ConfigError, match="batch 1 is empty"):
        padding_stats(np.array([3, 5]), np.array([0, 2, 2]))


def test_batch_stats_from_packed_batches():
    stats = BatchStats()
    collate = pack_collate(8)
    stats.update(collate([[1, 2, 3], [4, 5, 6, 7, 8]]))
    stats.update(collate([[1]]))
    assert (stats.batches, stats.rows, stats.real_tokens, stats.total_tokens) == (2, 2, 9, 16)
    assert stats.shapes == {(1, 8): 2}
    assert stats.as_padding_stats() == collate.stats.as_padding_stats()
    stats.reset()
    assert stats.batches == 0 and stats.efficiency == 1.0


def test_length_histogram_and_rendering():
    lengths = np.array([1, 2, 2, 3, 10, 10, 10, 10])
    hist = length_histogram(lengths, bins=3)
    assert hist.edges.tolist() == [1, 4, 8, 11] and hist.counts.tolist() == [4, 0, 4] and hist.total == 8
    lines = render_histogram(hist, width=10)
    assert lines == [
        " 1-3          4  50.0% ##########",
        " 4-7          0   0.0% ",
        " 8-10         4  50.0% ##########",
    ]
    single = length_histogram(np.full(5, 7), bins=4)
    assert single.edges.tolist() == [7, 8] and render_histogram(single)[0].startswith("7-7")
    assert render_histogram(length_histogram(np.array([], dtype=np.uint32))) == ["(no samples)"]
    with pytest.raises(ConfigError, match="bins"):
        length_histogram(lengths, bins=0)
