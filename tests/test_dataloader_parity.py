"""stoker.DataLoader behaves like torch.utils.data.DataLoader on the same arguments and datasets."""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch.utils.data import (
    BatchSampler, Dataset, IterableDataset, RandomSampler, SequentialSampler, SubsetRandomSampler, get_worker_info,
)

import stoker


class Squares(Dataset):
    def __init__(self, n=23, slow_index=None, bad_index=None):
        self.n, self.slow_index, self.bad_index = n, slow_index, bad_index

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.slow_index:
            time.sleep(1.5)
        if i == self.bad_index:
            raise ValueError(f"bad sample {i}")
        info = get_worker_info()
        return {"i": i, "sq": torch.tensor([i * i]), "worker": -1 if info is None else info.id, "name": f"s{i}"}


class Counter(IterableDataset):
    """The documented pattern: split the range over workers with get_worker_info()."""

    def __init__(self, n=17):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.n, step))


def pair_collate(samples):
    return [s["i"] for s in samples], sum(s["sq"].item() for s in samples)


def seed_worker(worker_id):
    torch.manual_seed(1000 + worker_id)


def both(dataset, **kwargs):
    """Run torch's and stoker's loaders on the same arguments; return both outputs and lengths."""
    out = []
    for cls in (torch.utils.data.DataLoader, stoker.DataLoader):
        args = {k: (v() if callable(v) and k in ("sampler", "batch_sampler", "generator") else v) for k, v in kwargs.items()}
        loader = cls(dataset, **args)
        length = len(loader) if hasattr(dataset, "__len__") else None
        out.append((list(loader), length))
    return out


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


CASES = {
    "batch_size=None": dict(batch_size=None),
    "defaults": dict(),
    "shuffle+generator": dict(batch_size=4, shuffle=True, generator=lambda: torch.Generator().manual_seed(3)),
    "sampler": dict(batch_size=3, sampler=lambda: SubsetRandomSampler(range(0, 23, 2), torch.Generator().manual_seed(1))),
    "batch_sampler": dict(batch_sampler=lambda: BatchSampler(SequentialSampler(range(23)), 5, drop_last=False)),
    "drop_last": dict(batch_size=5, drop_last=True),
    "collate_fn": dict(batch_size=4, collate_fn=pair_collate),
    "workers+init_fn": dict(batch_size=4, num_workers=2, worker_init_fn=seed_worker),
    "persistent+prefetch": dict(batch_size=3, num_workers=2, persistent_workers=True, prefetch_factor=3),
    "random+workers": dict(batch_size=6, sampler=lambda: RandomSampler(range(23), generator=torch.Generator().manual_seed(9)),
                           num_workers=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_map_style_parity(case):
    (theirs, their_len), (ours, our_len) = both(Squares(), **CASES[case])
    assert our_len == their_len
    assert_same(theirs, ours)


@pytest.mark.parametrize("kwargs", [dict(batch_size=4), dict(batch_size=4, num_workers=2), dict(batch_size=None, num_workers=2),
                                    dict(batch_size=3, num_workers=2, drop_last=True)])
def test_iterable_parity_with_worker_info_sharding(kwargs):
    (theirs, their_len), (ours, our_len) = both(Counter(), **kwargs)
    assert our_len == their_len
    assert_same(theirs, ours)


def test_out_of_order_delivers_the_same_batches():
    (theirs, _), (ours, _) = both(Squares(), batch_size=2, num_workers=2, in_order=False)
    key = lambda batch: batch["i"].tolist()  # noqa: E731
    assert sorted(map(key, theirs)) == sorted(map(key, ours))


def test_persistent_workers_across_epochs():
    loaders = [cls(Squares(), batch_size=5, num_workers=2, persistent_workers=True)
               for cls in (torch.utils.data.DataLoader, stoker.DataLoader)]
    for _ in range(2):
        assert_same(list(loaders[0]), list(loaders[1]))


def raised(fn):
    """The exception `fn()` raises, with its traceback dropped at once.

    A traceback holds the loader's iterator in a reference cycle; collected later by the garbage collector, torch's
    iterator closes its queues before telling its workers to stop, and waits seconds for each.
    """
    try:
        fn()
    except Exception as exc:
        exc.__traceback__ = None
        return exc
    raise AssertionError("no exception raised")


@pytest.mark.parametrize("cls", [torch.utils.data.DataLoader, stoker.DataLoader])
def test_worker_exception_is_reraised_the_same_way(cls):
    exc = raised(lambda: list(cls(Squares(bad_index=5), batch_size=2, num_workers=2)))
    assert type(exc) is ValueError
    assert re.search(r"(?s)Caught ValueError in DataLoader worker process \d.*bad sample 5", str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [torch.utils.data.DataLoader, stoker.DataLoader])
def test_timeout_is_an_error(cls):
    exc = raised(lambda: list(cls(Squares(slow_index=0), batch_size=1, num_workers=1, timeout=0.5)))
    assert type(exc) is RuntimeError and "timed out after 0.5 seconds" in str(exc)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset=Counter(), shuffle=True), "shuffle"),
    (dict(dataset=Counter(), sampler=[0, 1]), "sampler"),
    (dict(dataset=Squares(), prefetch_factor=2), "prefetch_factor"),
    (dict(dataset=Squares(), batch_sampler=[[0]], batch_size=2), "batch_sampler"),
    (dict(dataset=Squares(), num_workers=-1), "num_workers"),
    (dict(dataset=Squares(), persistent_workers=True), "persistent_workers"),
])
def test_invalid_arguments_fail_the_same_way(kwargs, message):
    errors = []
    for cls in (torch.utils.data.DataLoader, stoker.DataLoader):
        with pytest.raises(ValueError, match=message) as info:
            cls(**kwargs)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_it_is_a_torch_dataloader_with_the_same_attributes():
    loader = stoker.DataLoader(Squares(), batch_size=4, shuffle=True, num_workers=2, drop_last=True)
    reference = torch.utils.data.DataLoader(Squares(), batch_size=4, shuffle=True, num_workers=2, drop_last=True)
    assert isinstance(loader, torch.utils.data.DataLoader)
    for name in ("batch_size", "drop_last", "num_workers", "prefetch_factor", "timeout", "pin_memory", "in_order"):
        assert getattr(loader, name) == getattr(reference, name)
    assert type(loader.sampler) is type(reference.sampler) and len(loader) == len(reference) == 5
    with pytest.raises(ValueError, match="batch_size attribute should not be set"):
        loader.batch_size = 3


def test_it_is_generic_like_torch():
    # Annotations and code that subscript the class (`DataLoader[int]`) work as they do with torch's.
    reference = torch.utils.data.DataLoader[int]
    alias = stoker.DataLoader[int]
    assert alias.__origin__ is stoker.DataLoader and alias.__args__ == reference.__args__ == (int,)
    loader = alias(Squares(), batch_size=4)
    assert isinstance(loader, stoker.DataLoader) and isinstance(loader, torch.utils.data.DataLoader)
    assert_same(list(reference(Squares(), batch_size=4)), list(loader))
