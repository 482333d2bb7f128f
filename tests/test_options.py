"""The checks every options object shares (stoker.options), and options objects that check themselves when built."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from stoker.cli import parse_size as cli_size
from stoker.dataloader import ReadOptions
from stoker.dataloader.stream import BatchPlan
from stoker.errors import ConfigError
from stoker.options import check_seed, epoch_rng, parse_size, positive_int


@pytest.mark.parametrize("text, nbytes", [("4GB", 4 << 30), ("512MB", 512 << 20), (" 1.5 kb", 1536), ("256M", 256 << 20),
                                          ("1GiB", 1 << 30), ("2t", 2 << 40), ("100", 100), (1000, 1000),
                                          (np.int64(7), 7)])
def test_one_size_parser_for_the_api_and_the_command_line(text, nbytes):
    assert parse_size(text) == nbytes
    if isinstance(text, str):
        assert cli_size(text) == nbytes  # the same units on the command line


@pytest.mark.parametrize("bad", ["lots", "-1GB", "0", 0, "4 parsecs", True, 1.5, None])
def test_bad_sizes_name_the_parameter(bad):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_size(bad, "memory_budget")
    if isinstance(bad, str):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_size(bad)


def test_positive_ints_and_seeds():
    assert positive_int("batch_size", 3) == 3 and positive_int("x", None, allow_none=True) is None
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            positive_int("batch_size", bad)
    assert check_seed(0) == 0 and check_seed(np.uint32(5)) == 5
    for bad in (-1, 1.0, False, "1"):
        with pytest.raises(ConfigError, match="epoch must be a non-negative integer"):
            check_seed(bad, "epoch")


def test_epoch_rng_depends_on_every_key():
    draws = {tuple(epoch_rng(*keys).integers(0, 1 << 30, 4)) for keys in [(1, 2, 1), (1, 2, 0), (1, 3, 0), (2, 2, 0)]}
    assert len(draws) == 4
    # numpy's SeedSequence ignores trailing zeros: a key of 0 (worker 0) keeps the stream of the bare (seed, epoch).
    assert np.array_equal(epoch_rng(1, 2).permutation(50), epoch_rng(1, 2, 0).permutation(50))
    assert np.array_equal(epoch_rng(1, 2, 0).permutation(50), epoch_rng(1, 2, 0).permutation(50))


def test_options_objects_are_checked_when_built():
    with pytest.raises(ConfigError, match="read options"):
        ReadOptions(attempts=0)
    with pytest.raises(ConfigError, match="bundle"):
        BatchPlan(batch_size=8, bundle=0)


def test_lru_closes_what_it_evicts_and_only_that():
    from stoker.lru import LRU

    closed = []
    lru: LRU[str, str] = LRU(2, closed.append)
    lru.put("a", "A")
    lru.put("b", "B")
    assert lru.get("a") == "A"  # a is now the most recently used
    lru.put("c", "C")
    assert closed == ["B"] and list(lru) == ["a", "c"]
    assert lru.pop("a") == "A" and closed == ["B"]  # taken out, not closed
    lru.forget()
    assert len(lru) == 0 and closed == ["B"]  # another process's values are dropped, not closed
    lru.put("d", "D")
    lru.clear()
    assert closed == ["B", "D"]


def test_errors_name_python_options_and_the_cli_shows_its_flags():
    from stoker.cli import cli_wording
    from stoker.formats.pack import PackOptions

    with pytest.raises(ConfigError) as info:
        PackOptions(on_error="ignore")
    assert "--" not in str(info.value) and str(info.value).startswith("on_error='ignore'")
    assert cli_wording(str(info.value)).startswith("--on-error 'ignore'")
    assert cli_wording("fix it or pass on_error='skip'") == "fix it or pass --on-error skip"
    assert cli_wording("num_workers=2 and workers=0") == "num_workers=2 and --workers 0"  # whole names only
