"""Answers kept while what they were built from is unchanged: a hot product page read again is
not decoded and built again. Each entry is checked against its source on every read, so nothing
stale is ever served; the cache only saves the work."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
# Answers kept. An entry is one message and its source (tuples of bytes, which the garbage
# collector stops tracking), so a full collection stays short: 4,096 SKUs of 40 locations kept
# as StockLevels added ~250k objects for every full collection to walk (86 ms); kept as
# messages, 12k (about 1 ms).
VIEWS_KEPT = 4096


class Views(Generic[V]):
    """The last value built for each key, with the source it was built from (compared by
    value). At most `max_entries` keys; the oldest entry goes first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[object, V]] = {}

    def get(self, key: Hashable, source: object) -> V | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == source:
            return entry[1]
        return None

    def put(self, key: Hashable, source: object, value: V) -> None:
        self._entries.pop(key, None)
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (source, value)
