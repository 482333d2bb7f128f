"""Ring buffer, percentiles, rates and the stage timer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stoker.errors import ConfigError
from stoker.perf.stats import RingBuffer, StageTimer, percentiles, rate


def test_ring_buffer_keeps_the_most_recent_rows_oldest_first() -> None:
    ring = RingBuffer(3, width=2)
    assert ring.values().shape == (0, 2)
    for i in range(5):
        ring.append(i, 10 * i)
    assert len(ring) == 3
    assert ring.total_appended == 5
    np.testing.assert_array_equal(ring.values(), [[2, 20], [3, 30], [4, 40]])


def test_ring_buffer_before_wrapping_returns_only_written_rows() -> None:
    ring = RingBuffer(4)
    ring.append(1.5)
    ring.append(2.5)
    np.testing.assert_array_equal(ring.values()[:, 0], [1.5, 2.5])


def test_ring_buffer_rejects_empty_capacity() -> None:
    with pytest.raises(ConfigError):
        RingBuffer(0)


def test_percentiles_and_empty_input() -> None:
    assert percentiles(range(1, 101), (50, 100)) == {50: pytest.approx(50.5), 100: 100.0}
    assert all(math.isnan(v) for v in percentiles([], (50, 90)).values())


def test_rate_over_no_time_is_unknown() -> None:
    assert rate(10, 2.0) == 5.0
    assert math.isnan(rate(10, 0.0))


def test_stage_timer_accumulates_merges_and_rates() -> None:
    timer = StageTimer()
    timer.add("read", 2.0, items=100)
    timer.add("decode", 1.0, items=10)
    other = StageTimer()
    other.add("decode", 1.0, items=30)
    with other.stage("collate", items=4):
        pass
    timer.merge(other)
    times = timer.times()
    assert list(times) == ["read", "decode", "collate"]
    assert times["decode"] == 2.0
    assert 0 <= times["collate"] < 1.0
    assert timer.rates()["read"] == 50.0
    assert timer.rates()["decode"] == 20.0
