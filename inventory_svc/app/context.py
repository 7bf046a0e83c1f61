"""What every use case shares: settings, the two stores, the location cache, Redis hygiene."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

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

    async def refresh_locations(self) -> None:
        fresh = {loc.id: loc for loc in await self.pg.list_locations()}
        if fresh != self.locations:
            self.locations = fresh
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
        """Mirror committed levels into Redis. Postgres has them already, so a Redis failure here
        is logged, not returned: the reconciler brings Redis back in line."""
        try:
            await asyncio.shield(self.redis.apply_changes(list(levels)))
        except Unavailable as exc:
            log.warning("redis update after commit failed, reconciler will repair: %s", exc)

    async def give_back(self, hold: Hold) -> None:
        try:
            await asyncio.shield(self.redis.give_back(hold))
        except Unavailable as exc:
            log.warning("could not give back a redis hold, reconciler will repair: %s", exc)

    async def forget(self, hold: Hold, committed: Sequence[StockLevel]) -> None:
        """Postgres committed the hold: its units move from held to the committed levels (the
        reconciler would do it too, finding the reservation in Postgres)."""
        try:
            await asyncio.shield(self.redis.forget(hold, committed))
        except Unavailable as exc:
            log.warning("could not settle a redis hold, reconciler will: %s", exc)
