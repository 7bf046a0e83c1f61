"""Background work every replica runs, coordinated only through Postgres (DESIGN §2):
the expiry sweeper, the Redis reconciler and the location cache refresh."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import asyncpg

from inventory_svc.app.context import Context
from inventory_svc.app.reservations import ReservationService
from inventory_svc.domain.errors import DomainError
from inventory_svc.domain.model import StockLevel
from inventory_svc.storage.pg import STOCK_SELECT
from inventory_svc.storage.pg_base import advisory_key, translate_errors
from inventory_svc.storage.redis_stock import HoldRecord, encode_level

log = logging.getLogger(__name__)
REBUILD_LOCK = advisory_key("inventory:redis-rebuild")
PAGE = 500  # SKUs per rebuild batch
# SKUs per reconcile round. The round's decoding and comparing runs on the serving event loop:
# small rounds with a yield between them keep each stall short (a 500-SKU round stalled the
# loop for up to ~170 ms on the 10k-SKU demo, which showed up as every RPC's p99).
RECONCILE_PAGE = 50


ORPHAN_MARGIN_S = 0.5  # beyond hold_timeout_s, for clocks and scheduling


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    skus: int
    stale_levels: int  # on_hand/safety behind Postgres: brought forward at once
    repaired_reserved: int  # reserved drift repaired (compare-and-set)
    suspects: int  # reserved drift on the safe side seen once: checked again next pass
    rebuilt: bool
    orphans_released: int = 0  # holds whose replica never committed them: given back
    in_flight: int = 0  # holds still waiting for their commit


class Reconciler:
    """Finds and repairs drift between Redis and Postgres (DESIGN I4).

    Every hold is recorded in Redis (hold.lua) under its reservation id until its commit is done.
    A pass reads Redis first (levels and hold records in one MULTI), then Postgres in one snapshot
    (levels, and which recorded reservations exist), so for each SKU-location

        expected Redis reserved = Postgres reserved + units of holds not (yet) in Postgres.

    A hold record with no reservation that is older than hold_timeout_s (the longest a call waits
    for its commit) is an orphan: its replica died between Redis and Postgres. It is given back
    exactly once, under the stock rows' locks so no commit of it can be under way, on the first
    pass or hold check after it became one: within one reconcile interval. Redis reserved below
    the expected value shows more than Postgres committed and is repaired at once; above it, it
    may be a release whose Redis update is on its way, so it is repaired only when the same
    difference is seen on two passes in a row. Every repair is a compare-and-set against what
    the pass read, so a change in between wins over the repair.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._suspects: dict[tuple[str, str], tuple[str, str]] = {}
        # SKUs with holds in flight, and when (monotonic) the youngest may become an orphan
        self._watch: dict[str, float] = {}

    @property
    def orphan_after_ms(self) -> int:
        return int((self.ctx.settings.hold_timeout_s + ORPHAN_MARGIN_S) * 1000)

    async def ensure_generation(self, *, startup: bool) -> bool:
        """Rebuild Redis from Postgres when it holds another database's data or lost its marker.

        At start a foreign or missing generation means a full overwrite. Mid-run a missing marker
        means Redis was flushed or restarted empty: SKUs already re-hydrated on demand are kept.
        (Data built on another Redis process is dropped as a connection opens: checkrun.lua.)
        """
        pg_gen = await self.ctx.pg.generation()
        redis_gen = await self.ctx.redis.generation()
        run_id = await self.ctx.redis.run_id()
        if redis_gen == pg_gen:
            if run_id and await self.ctx.redis.built_on() != run_id:
                await self.ctx.redis.set_generation(pg_gen, run_id)  # a marker of old
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
                await self.ctx.redis.set_generation(pg_gen, run_id)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK)
        return True

    async def run_pass(self) -> ReconcileReport:
        rebuilt = await self.ensure_generation(startup=False)
        total = ReconcileReport(0, 0, 0, 0, rebuilt)
        after = ""
        suspects_before = self._suspects
        self._suspects = {}
        while page := await self.ctx.pg.stock_page(after, RECONCILE_PAGE):
            after = max(page)
            total = _add(total, await self.reconcile(sorted(page), suspects_before))
            await asyncio.sleep(0)  # let waiting RPCs run between rounds
        report = replace(total, suspects=len(self._suspects))
        if report.stale_levels or report.repaired_reserved or rebuilt or report.orphans_released:
            log.warning("reconciler: %s", report)
        return report

    async def check_holds(self) -> ReconcileReport | None:
        """Reconcile the SKUs whose holds in flight are due to commit by now."""
        now = time.monotonic()
        due = sorted(sku for sku, at in self._watch.items() if at <= now)
        if not due:
            return None
        for sku in due:
            self._watch.pop(sku, None)
        report = await self.reconcile(due, self._suspects)
        if report.repaired_reserved or report.orphans_released:
            log.warning("reconciler (hold check): %s", report)
        return report

    def next_hold_check(self) -> float | None:
        return min(self._watch.values(), default=None)

    async def reconcile(
        self, skus: list[str], suspects_before: dict[tuple[str, str], tuple[str, str]]
    ) -> ReconcileReport:
        """One round over these SKUs (see the class doc)."""
        redis = self.ctx.redis
        cached, holds, now_ms = await redis.inspect(skus)
        ids = sorted({h.id for recs in holds.values() for h in recs})
        levels, committed = await self._pg_view(skus, ids)
        missing = {s: levels.get(s, []) for s in skus if cached[s] is None}
        await redis.load(missing, force=False)
        in_flight: dict[tuple[str, str], int] = {}
        orphans: list[tuple[str, HoldRecord]] = []
        young = 0
        for sku in skus:
            if cached[sku] is None:
                continue
            for rec in holds[sku]:
                if rec.id in committed:  # its commit is done; the record was left behind
                    await redis.settle_record(sku, rec.id, give_back=False)
                    continue
                age_ms = now_ms - rec.created_ms
                if age_ms >= self.orphan_after_ms:
                    orphans.append((sku, rec))
                    continue
                young += 1
                for loc, qty in rec.units.items():
                    in_flight[(sku, loc)] = in_flight.get((sku, loc), 0) + qty
                at = time.monotonic() + (self.orphan_after_ms - age_ms) / 1000 + 0.01
                self._watch[sku] = min(self._watch.get(sku, at), at)
        released, touched = await self._release_orphans(orphans)
        stale: list[StockLevel] = []
        repaired = 0
        for sku in skus:
            if cached[sku] is None:
                continue
            in_redis = {lv.location_id: lv for lv in cached[sku] or []}
            for lv in levels.get(sku, []):
                key = (sku, lv.location_id)
                before = suspects_before.get(key)
                self._suspects.pop(key, None)
                have = in_redis.get(lv.location_id)
                if have is None or have.version < lv.version:
                    stale.append(lv)
                    continue
                if key in touched:
                    continue
                want = replace(lv, reserved=lv.reserved + in_flight.get(key, 0))
                if have == want:
                    continue
                seen = (encode_level(have), encode_level(want))
                if (have.reserved < want.reserved or have.version != want.version
                        or (have.on_hand, have.safety_stock) != (want.on_hand, want.safety_stock)
                        or before == seen):
                    # Redis shows more than Postgres committed (or the same drift twice): repair
                    repaired += await redis.repair(sku, lv.location_id, *seen)
                else:
                    self._suspects[key] = seen
        await redis.apply_changes(stale)
        return ReconcileReport(len(skus), len(stale), repaired, 0, False, released, young)

    async def _pg_view(
        self, skus: list[str], hold_ids: list[str]
    ) -> tuple[dict[str, list[StockLevel]], set[str]]:
        """Stock of these SKUs and which of these reservations exist, in one snapshot."""
        with translate_errors():
            pool, timeout = self.ctx.pg.pool, self.ctx.settings.pg_timeout_s
            async with pool.acquire(timeout=timeout) as conn, conn.transaction(
                    isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(STOCK_SELECT + " WHERE s.sku = ANY($1::text[])", skus)
                found = await conn.fetch(
                    "SELECT id FROM reservations WHERE id = ANY($1::text[])", hold_ids
                ) if hold_ids else []
        levels: dict[str, list[StockLevel]] = {}
        for r in rows:
            levels.setdefault(r["sku"], []).append(StockLevel(
                r["sku"], r["location_id"], r["on_hand"], r["reserved"], r["safety"],
                r["version"]))
        return levels, {r["id"] for r in found}

    async def _release_orphans(
        self, orphans: list[tuple[str, HoldRecord]]
    ) -> tuple[int, set[tuple[str, str]]]:
        """Give back holds whose reservation never reached Postgres. Under the stock rows' locks:
        a commit of one of them still under way holds those locks, and then we wait for it (or
        leave it to the next check when it takes longer)."""
        if not orphans:
            return 0, set()
        keys = sorted({(sku, loc) for sku, rec in orphans for loc in rec.units})
        released = 0
        with translate_errors():
            pool, timeout = self.ctx.pg.pool, self.ctx.settings.pg_timeout_s
            async with pool.acquire(timeout=timeout) as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '500ms'")
                try:
                    await conn.execute(
                        "SELECT 1 FROM stock s JOIN unnest($1::text[], $2::text[])"
                        " AS k(sku, loc) ON s.sku = k.sku AND s.location_id = k.loc"
                        " ORDER BY s.sku, s.location_id FOR UPDATE OF s",
                        [k[0] for k in keys], [k[1] for k in keys])
                except asyncpg.LockNotAvailableError:
                    log.info("reconciler: stock of %d orphan holds is busy; next time",
                             len(orphans))
                    for sku, _ in orphans:
                        self._watch[sku] = time.monotonic() + 0.5
                    return 0, {k for k in keys}
                found = {r["id"] for r in await conn.fetch(
                    "SELECT id FROM reservations WHERE id = ANY($1::text[])",
                    [rec.id for _, rec in orphans])}
                for sku, rec in orphans:
                    gave = await self.ctx.redis.settle_record(
                        sku, rec.id, give_back=rec.id not in found)
                    released += int(gave and rec.id not in found)
        if released:
            log.warning("reconciler: gave back %d orphaned holds", released)
        return released, set(keys)


def _add(a: ReconcileReport, b: ReconcileReport) -> ReconcileReport:
    return ReconcileReport(
        a.skus + b.skus, a.stale_levels + b.stale_levels,
        a.repaired_reserved + b.repaired_reserved, 0, a.rebuilt,
        a.orphans_released + b.orphans_released, a.in_flight + b.in_flight)


async def run_reconciler(ctx: Context, reconciler: Reconciler) -> None:
    """Full passes every reconcile interval; in between, a hold check of the SKUs whose holds
    in flight reach their commit deadline, so an orphan waits at most one interval."""
    next_pass = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            if now >= next_pass:
                next_pass = now + ctx.settings.reconcile_interval_s
                await reconciler.run_pass()
            else:
                await reconciler.check_holds()
        except DomainError as exc:  # e.g. UNAVAILABLE while a store is down: try again later
            log.warning("reconciler: %s", exc.message)
            next_pass = min(next_pass, time.monotonic() + min(
                1.0, ctx.settings.reconcile_interval_s))
        except Exception:
            log.exception("reconciler failed")
        wake = min(next_pass, reconciler.next_hold_check() or next_pass)
        await asyncio.sleep(max(0.0, wake - time.monotonic()))


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
        tg.create_task(run_reconciler(ctx, reconciler))
        tg.create_task(every(5.0, "location refresh", ctx.refresh_locations))
