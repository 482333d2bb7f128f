"""The pure order functions, checked against plain-Python references."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoker.bucketing import plans
from stoker.options import epoch_rng

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

lengths_strategy = st.lists(st.integers(1, 70_000), min_size=1, max_size=200).map(np.array)


def test_random_permutation_is_a_permutation_on_both_paths():
    for n in (10, 200_000):  # below and above the two-pass threshold
        first = plans.random_permutation(n, epoch_rng(1, 2))
        assert np.array_equal(np.sort(first), np.arange(n))
        assert np.array_equal(first, plans.random_permutation(n, epoch_rng(1, 2)))
        assert not np.array_equal(first, plans.random_permutation(n, epoch_rng(1, 3)))
    # every bucket is shuffled: position 0 is drawn from the whole range, not the start of a bucket
    firsts = [int(plans.random_permutation(100_000, epoch_rng(0, e))[0]) for e in range(20)]
    assert max(firsts) > 50_000 > min(firsts)


@SETTINGS
@given(lengths_strategy, st.integers(1, 50), st.integers(0, 10))
def test_megabatches_sorted_longest_first_and_stable(lengths, megabatch, seed):
    order = plans.random_permutation(len(lengths), epoch_rng(seed, 0))
    result = plans.sort_within_megabatches(order, plans.descending_keys(lengths), megabatch)
    for start in range(0, len(order), megabatch):
        before, after = order[start : start + megabatch], result[start : start + megabatch]
        # a stable sort by descending length: compare with Python's (stable) sorted
        assert after.tolist() == sorted(before.tolist(), key=lambda i: -lengths[i])


def reference_budget_bounds(sorted_lengths, megabatch, budget):
    bounds = []
    for seg_start in range(0, len(sorted_lengths), megabatch):
        seg_end = min(seg_start + megabatch, len(sorted_lengths))
        i = seg_start
        while i < seg_end:
            padded = -(-int(sorted_lengths[i]) // budget.pad_to_multiple_of) * budget.pad_to_multiple_of
            size = budget.max_tokens // padded
            if budget.max_batch_size is not None:
                size = min(size, budget.max_batch_size)
            bounds.append((i, min(i + size, seg_end)))
            i = bounds[-1][1]
    return bounds


@SETTINGS
@given(
    st.lists(st.integers(1, 100), min_size=1, max_size=300).map(np.array),
    st.integers(1, 80),
    st.integers(104, 1000),
    st.sampled_from([1, 8]),
    st.one_of(st.none(), st.integers(1, 10)),
)
def test_token_budget_bounds_match_greedy_reference(lengths, megabatch, max_tokens, multiple, max_batch_size):
    budget = plans.TokenBudget(max_tokens, multiple, max_batch_size)
    order = plans.sort_within_megabatches(np.arange(len(lengths)), plans.descending_keys(lengths), megabatch)
    starts, ends = plans.token_budget_bounds(order, lengths, megabatch, budget)
    assert list(zip(starts.tolist(), ends.tolist())) == reference_budget_bounds(lengths[order], megabatch, budget)


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=40), st.integers(1, 7), st.booleans())
def test_equalise_for_ranks_keeps_or_drops_whole_batches(sizes, world, drop_last):
    ends = np.cumsum(sizes)
    plan = plans.Plan(np.arange(int(ends[-1])), ends - np.array(sizes), ends)
    result = plans.equalise_for_ranks(plan, world, drop_last)
    assert result.num_batches % world == 0
    flat = result.order[plans.batch_positions(result.starts, result.ends)]
    if drop_last:
        kept = len(sizes) - len(sizes) % world
        assert flat.tolist() == list(range(int(ends[kept - 1]) if kept else 0))
        assert result.dropped == int(ends[-1]) - len(flat)
    elif result.repeated == 0:
        assert flat.tolist() == list(range(int(ends[-1])))  # split in place: same samples, same order
        assert result.num_batches - len(sizes) < world
    else:
        assert result.repeated < world and len(flat) == int(ends[-1]) + result.repeated
        assert (result.ends - result.starts == 1).all()
