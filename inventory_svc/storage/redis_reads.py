"""Reads of stock hashes for availability: the reads of one turn of the event loop go as one
pipeline, a read of some locations reads only their fields, and a whole hash this process read
before is read again only if its change count (the marker field "_", lua/bump.lua) moved.

Under load many product pages ask at once, and a write to the socket costs more than the read
it carries; a SKU stocked at 500 locations is a 40 kB reply that takes longer to parse than its
marker takes to read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from inventory_svc.storage.coalesce import Coalescer
from inventory_svc.storage.redis_mux import RedisMux, pipeline

Fields = dict[bytes, bytes]
Read = tuple[tuple[str, ...], tuple[str, ...]]  # the keys, and the locations (none: all)
# Whole hashes kept with their change count, up to this many fields in all (~30 MB; the least
# recently read go first): the hot SKUs, which are the ones read again and again.
KEPT_FIELDS = 200_000


class HashReader:
    def __init__(self, client: Any, mux: RedisMux | None = None) -> None:
        self.client = client
        self.mux = mux
        self._reads: Coalescer[Read, list[Fields]] = Coalescer(self._read_many)
        self._kept: OrderedDict[str, Fields] = OrderedDict()
        self._kept_fields = 0

    async def read(self, keys: Sequence[str], locations: Sequence[str] = ()) -> list[Fields]:
        """Each hash as stored, or with `locations` only those fields (and the marker "_"; a
        hash without it is not hydrated). Sent with whatever else this turn reads."""
        return await self._reads.run((tuple(keys), tuple(locations)))

    async def _read_many(self, batch: list[Read]) -> list[list[Fields] | BaseException]:
        whole = list(dict.fromkeys(k for keys, locs in batch if not locs for k in keys))
        some = list(dict.fromkeys((k, locs) for keys, locs in batch if locs for k in keys))
        # what is kept now: another batch may drop a hash from _kept while this one awaits
        kept = {k: self._kept[k] for k in whole if k in self._kept}
        known = list(kept)
        unknown = [k for k in whole if k not in kept]
        out = await self._execute([
            *(("HGET", key, "_") for key in known), *(("HGETALL", key) for key in unknown),
            *(("HMGET", key, "_", *locs) for key, locs in some)])
        marks, full, partial = out[:len(known)], out[len(known):len(whole)], out[len(whole):]
        got: dict[str, Fields] = dict(zip(unknown, full, strict=True))
        moved = [k for k, mark in zip(known, marks, strict=True)
                 if mark is None or kept[k].get(b"_") != mark]
        for key in known:
            if key not in moved:
                got[key] = kept[key]
                if key in self._kept:
                    self._kept.move_to_end(key)
        if moved:  # changed since kept: read again, whole
            got.update(zip(moved, await self._execute([("HGETALL", key) for key in moved]),
                           strict=True))
        for key in [*unknown, *moved]:
            self._keep(key, got[key])
        parts: dict[tuple[str, tuple[str, ...]], Fields] = {
            (key, locs): {name.encode(): value for name, value in zip(("_", *locs), values,
                                                                       strict=True)
                          if value is not None}
            for (key, locs), values in zip(some, partial, strict=True)}
        return [[parts[(k, locs)] if locs else got[k] for k in keys] for keys, locs in batch]

    async def _execute(self, commands: list[tuple[str, ...]]) -> list[Any]:
        """One pipeline (redis_mux.pipeline); the first error reply raised."""
        out = await pipeline(self.client, self.mux, commands)
        for reply in out:
            if isinstance(reply, Exception):
                raise reply
        return out

    def _keep(self, key: str, fields: Fields) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self._kept_fields -= len(old)
        if b"_" not in fields or len(fields) > KEPT_FIELDS // 10:  # unhydrated, or too wide
            return
        self._kept[key] = fields
        self._kept_fields += len(fields)
        while self._kept_fields > KEPT_FIELDS:
            self._kept_fields -= len(self._kept.popitem(last=False)[1])
