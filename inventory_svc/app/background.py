"""Background work every replica runs, coordinated only through Postgres (DESIGN §2):
the expiry sweeper, the Redis reconciler and the location cache refresh."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inventory_svc.app.context import Context
from inventory_svc.app.reservations import ReservationService
from inventory_svc.domain.errors import DomainError
from inventory_svc.domain.model import StockLevel
from inventory_svc.storage.pg_base import advisory_key
from inventory_svc.storage.redis_stock import encode_level

log = logging.getLogger(__name__)
REBUILD_LOCK = advisory_key("inventory:redis-rebuild")
PAGE = 500


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    skus: int
    stale_levels: int  # on_hand/safety behind Postgres: brought forward at once
    repaired_reserved: int  # reserved drift seen twice in a row: repaired
    suspects: int  # reserved drift seen once: checked again next pass
    rebuilt: bool


class Reconciler:
    """Finds and repairs drift between Redis and Postgres (DESIGN I4).

    Reserved units differ legitimately while a hold waits for its Postgres commit, so a reserved
    difference is repaired only when the very same difference is seen on two passes in a row, and
    then by compare-and-set, so a change in between wins over the repair.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._suspects: dict[tuple[str, str], tuple[str, str]] = {}

    async def ensure_generation(self, *, startup: bool) -> bool:
        """Rebuild Redis from Postgres when it holds another database's data or lost its marker.

        At start a foreign or missing generation means a full overwrite. Mid-run a missing marker
        means Redis was flushed or restarted empty: SKUs already re-hydrated on demand are kept.
        """
        pg_gen = await self.ctx.pg.generation()
        redis_gen = await self.ctx.redis.generation()
        if redis_gen == pg_gen:
            return False
        force = startup or redis_gen is not None
        async with self.ctx.pg.pool.acquire() as conn:
            # One replica rebuilds; the others wait for it and then find the marker in place.
            await conn.execute("SELECT pg_advisory_lock($1)", REBUILD_LOCK)
            try:
                if await self.ctx.redis.generation() == pg_gen:
                    return False
                log.warning("rebuilding redis from postgres (redis generation %r, postgres %r)",
                            redis_gen, pg_gen)
                after = ""
                while page := await self.ctx.pg.stock_page(after, PAGE):
                    await self.ctx.redis.load(page, force=force)
                    after = max(page)
                await self.ctx.redis.set_generation(pg_gen)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK)
        return True

    async def run_pass(self) -> ReconcileReport:
        rebuilt = await self.ensure_generation(startup=False)
        suspects: dict[tuple[str, str], tuple[str, str]] = {}
        stale: list[StockLevel] = []
        repaired = skus = 0
        after = ""
        while page := await self.ctx.pg.stock_page(after, PAGE):
            after = max(page)
            skus += len(page)
            cached = await self.ctx.redis.read(list(page))
            missing = {s: lv for s, lv in page.items() if cached[s] is None}
            await self.ctx.redis.load(missing, force=False)
            for sku, levels in page.items():
                in_redis = {lv.location_id: lv for lv in cached[sku] or []}
                for lv in levels:
                    have = in_redis.get(lv.location_id)
                    if sku in missing:
                        continue
                    if have is None or have.version < lv.version:
                        stale.append(lv)
                    elif have.reserved != lv.reserved:
                        key, seen = (sku, lv.location_id), (encode_level(have), encode_level(lv))
                        if self._suspects.get(key) == seen:
                            repaired += await self.ctx.redis.repair(sku, lv.location_id, *seen)
                        else:
                            suspects[key] = seen
        await self.ctx.redis.apply_changes(stale)
        self._suspects = suspects
        report = ReconcileReport(skus, len(stale), repaired, len(suspects), rebuilt)
        if stale or repaired or rebuilt:
            log.warning("reconciler: %s", report)
        return report


async def every(interval_s: float, name: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run `step` forever at a fixed interval; a failed step is logged, never fatal."""
    while True:
        try:
            await step()
        except DomainError as exc:  # e.g. UNAVAILABLE while a store is down: try again later
            log.warning("%s: %s", name, exc.message)
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(interval_s)


async def run_background(ctx: Context, reservations: ReservationService,
                         reconciler: Reconciler) -> None:
    """The replica's background tasks, owned by one TaskGroup; cancel it to stop them all."""

    async def sweep() -> None:
        # Drain everything that is due, a batch per transaction.
        while await reservations.expire_due() >= ctx.settings.sweep_batch:
            pass

    async with asyncio.TaskGroup() as tg:
        tg.create_task(every(ctx.settings.sweep_interval_s, "expiry sweeper", sweep))
        tg.create_task(every(ctx.settings.reconcile_interval_s, "reconciler", reconciler.run_pass))
        tg.create_task(every(5.0, "location refresh", ctx.refresh_locations))
