"""Answers kept while what they were built from is unchanged: a hot product page read again is
not decoded and built again. Each entry is checked against its source on every read, so nothing
stale is ever served; the cache only saves the work."""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Views(Generic[V]):
    """The last value built for each key, with the source it was built from. `same` decides
    whether a source is unchanged (by value, or `operator.is_` for the very same object). At
    most `max_entries` keys; the oldest entry goes first."""

    def __init__(self, max_entries: int,
                 same: Callable[[object, object], bool] = operator.eq) -> None:
        self.max_entries = max_entries
        self.same = same
        self._entries: dict[Hashable, tuple[object, V]] = {}

    def get(self, key: Hashable, source: object) -> V | None:
        entry = self._entries.get(key)
        if entry is not None and self.same(entry[0], source):
            return entry[1]
        return None

    def put(self, key: Hashable, source: object, value: V) -> None:
        self._entries.pop(key, None)
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (source, value)
