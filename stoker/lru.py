"""A small least-recently-used map whose evicted values are closed: open shards, mapped files."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Up to `capacity` values by key; beyond that the least recently used is dropped, and `close(value)` called."""

    def __init__(self, capacity: int, close: Callable[[V], None] | None = None) -> None:
        self.capacity = max(1, int(capacity))
        self._close = close
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def get(self, key: K) -> V | None:
        """The value of `key` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def pop(self, key: K) -> V | None:
        """Take `key`'s value out (not closed), or None."""
        return self._items.pop(key, None)

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key` as the most recently used; close what no longer fits."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._closed(self._items.popitem(last=False)[1])

    def clear(self) -> None:
        """Close and drop everything."""
        while self._items:
            self._closed(self._items.popitem(last=False)[1])

    def forget(self) -> None:
        """Drop everything without closing it (values another process owns, e.g. after fork)."""
        self._items.clear()

    def _closed(self, value: V) -> None:
        if self._close is not None:
            self._close(value)
