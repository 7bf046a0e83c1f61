"""What every use case shares: settings, the two stores, the location cache, Redis hygiene."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence

from inventory_svc.config import Settings
from inventory_svc.domain.errors import NotFound, Unavailable
from inventory_svc.domain.model import Location, StockLevel
from inventory_svc.storage.pg import PgStore
from inventory_svc.storage.redis_stock import Hold, RedisStock

log = logging.getLogger(__name__)


class Context:
    def __init__(self, settings: Settings, pg: PgStore, redis: RedisStock) -> None:
        self.settings = settings
        self.pg = pg
        self.redis = redis
        self.locations: dict[str, Location] = {}
        self.locations_version = 0  # moves only when the locations really change
        self.active_location_ids: frozenset[str] = frozenset()  # of `locations`

    async def refresh_locations(self) -> None:
        fresh = {loc.id: loc for loc in await self.pg.list_locations()}
        if fresh != self.locations:
            self.locations = fresh
            self.active_location_ids = frozenset(x.id for x in fresh.values() if x.active)
            self.locations_version += 1

    def location(self, location_id: str) -> Location:
        loc = self.locations.get(location_id)
        if loc is None:
            raise NotFound("location", location_id)
        return loc

    async def known_location(self, location_id: str) -> Location:
        """Look in the cache, then in Postgres (another replica may have just added it)."""
        if location_id not in self.locations:
            await self.refresh_locations()
        return self.location(location_id)

    async def hydrate(self, skus: list[str]) -> None:
        """Load SKUs missing from Redis (flushed, evicted, never loaded) from Postgres."""
        snapshot = await self.pg.stock_of_skus(skus)
        await self.redis.load(snapshot, force=False)

    async def publish(self, levels: Iterable[StockLevel]) -> None:
        """Mirror committed levels into Redis."""
        await _best_effort(self.redis.apply_changes(list(levels)), "redis update after commit")

    async def give_back(self, hold: Hold) -> None:
        await _best_effort(self.redis.give_back(hold), "giving back a redis hold")

    async def forget(self, hold: Hold, committed: Sequence[StockLevel]) -> None:
        """Postgres committed the hold: its units move from held to the committed levels (the
        reconciler would do it too, finding the reservation in Postgres)."""
        await _best_effort(self.redis.forget(hold, committed), "settling a redis hold")


async def _best_effort(step: Awaitable[object], what: str) -> None:
    """A Redis step after Postgres decided: run to the end even if the call is cancelled, and a
    failure is logged, not returned (Postgres has the truth; the reconciler repairs Redis)."""
    try:
        await asyncio.shield(step)
    except Unavailable as exc:
        log.warning("%s failed, the reconciler will repair it: %s", what, exc)
