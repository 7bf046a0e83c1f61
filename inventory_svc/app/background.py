"""Background work every replica runs, coordinated only through Postgres (DESIGN §2):
the expiry sweeper, the Redis reconciler and the location cache refresh.

The sweeper and the reconciler are safe with any number of replicas (SKIP LOCKED, advisory
locks, compare-and-set), so running them in every process is correct but wasteful. The workers
of one `serve --workers N` elect one of them to run both (`lead`): the one holding a session-level
advisory lock on a connection of its own. When the leader dies its session ends, the lock goes
with it and another worker takes it within LEAD_RETRY_S. The location refresh keeps each
process's own cache, so every process runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from inventory_svc.app import metrics
from inventory_svc.app.cancelling import nap, stop_if_cancelled
from inventory_svc.app.context import Context
from inventory_svc.app.key_filter import KeyFilterKeeper
from inventory_svc.app.reservations import ReservationService
from inventory_svc.app.watch import run_watch_background
from inventory_svc.config import Settings
from inventory_svc.domain.errors import DomainError
from inventory_svc.domain.model import StockLevel
from inventory_svc.storage import redis_keys
from inventory_svc.storage.pg import STOCK_SELECT, PgStore, levels_by_sku
from inventory_svc.storage.pg_base import advisory_key, translate_errors
from inventory_svc.storage.redis_layout import HoldRecord, encode_level
from inventory_svc.storage.redis_stock import translate_redis

log = logging.getLogger(__name__)
REBUILD_LOCK = advisory_key("inventory:redis-rebuild")
PAGE = 500  # SKUs per rebuild batch
PROGRESS_EVERY_S = 5.0  # a rebuild of a large catalogue says how far it got this often
# SKUs per reconcile round. The round's decoding and comparing runs on the serving event loop:
# small rounds with a yield between them keep each stall short (a 500-SKU round stalled the
# loop for up to ~170 ms on the 10k-SKU demo, which showed up as every RPC's p99).
RECONCILE_PAGE = 50


ORPHAN_MARGIN_S = 0.5  # beyond hold_timeout_s, for clocks and scheduling
# A follower asks for the leader's lock this often, and the leader checks its lock connection
# this often: a dead leader is replaced within about this long.
LEAD_RETRY_S = 2.0
KEY_FILTER_LOOK_S = 1.0  # how often the leader looks whether the key filter needs starting


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    skus: int
    stale_levels: int  # Redis behind Postgres (an older seq, or missing): brought forward
    repaired: int  # Redis not what Postgres and the hold records say: compare-and-set
    rebuilt: bool
    orphans_released: int = 0  # holds whose replica never committed them: given back
    in_flight: int = 0  # holds still waiting for their commit
    settled: int = 0  # records of committed holds left behind (their replica died): ended


class Reconciler:
    """Finds and repairs drift between Redis and Postgres (DESIGN I4).

    A pass reads Redis first (values and hold records in one MULTI), then Postgres in one
    snapshot (levels, and which recorded reservations exist). Every change to a stock row takes
    a new seq in Postgres and Redis only ever takes newer seqs, so for each SKU-location:

    - Redis seq older than Postgres' (or the field missing): a commit whose update has not
      arrived (or was lost). Brought forward; a late update is then ignored by seq.
    - the same seq with other values, a seq Postgres never gave, or `held` units that are not
      the sum of the hold records read with them: Redis is wrong. Repaired at once, by
      compare-and-set against what the pass read, so a change in between wins over the repair.

    Every hold is recorded in Redis (hold.lua) under its reservation id until settled. A record
    whose reservation is in Postgres was left behind by a replica that died after its commit:
    ended, its units moving to the committed levels. A record with no reservation older than
    hold_timeout_s (the longest a call waits for its commit) is an orphan: its replica died
    between Redis and Postgres. It is given back exactly once, under the stock rows' locks so no
    commit of it can be under way, on the first pass or hold check after it became one: within
    one reconcile interval.

    A full pass looks at every row. The passes in between (all but every
    `reconcile_full_every`-th) look only at rows whose seq moved since a mark taken at least
    `reconcile_seq_window_s` before (so no transaction that took a smaller seq is still open),
    and at every SKU with hold records: the work follows the changes, not the catalogue's size.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # SKUs with holds in flight, and when (monotonic) the youngest may become an orphan
        self._watch: dict[str, float] = {}
        self._passes = 0
        self._marks: list[tuple[float, int]] = []  # (monotonic, seq) at the start of passes

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
        async with self.ctx.pg.pool.acquire() as conn, conn.transaction():
            # One replica rebuilds; the others wait for it and then find the marker in place.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REBUILD_LOCK)
            if await self.ctx.redis.generation() == pg_gen:
                return False
            # The level says whether someone should look: at start an empty Redis (no marker)
            # is what a fresh or restarted store looks like (the embedded Valkey always is once
            # the service restarted it; its old data was dropped as built on another process):
            # INFO. Data of another database (two deployments sharing a Redis, a database
            # re-created or restored) or data lost while serving (a flush, a restart, a
            # failover under us) is a problem to explain: WARNING.
            if redis_gen is None and startup:
                log.info("redis holds no stock of this database yet (a fresh or restarted "
                         "redis): loading it from postgres")
            elif redis_gen is None:
                log.warning("redis lost its data while serving (flushed, restarted or failed "
                            "over): rebuilding it from postgres")
            else:
                log.warning("redis holds data of another database (generation %r, this one's "
                            "%r): replacing it from postgres", redis_gen, pg_gen)
            if redis_gen is not None:
                # a key filter held another database's keys: a new one starts, filled from
                # this database (the old bits can only send losers to Postgres); a cluster has
                # none, and the reset finds nothing there
                with translate_redis():
                    await redis_keys.reset(self.ctx.redis.client)
            start = last = time.monotonic()
            after, skus = "", 0
            while page := await self.ctx.pg.stock_page(after, PAGE):
                await self.ctx.redis.load(page, force=force)
                stop_if_cancelled()
                after = max(page)
                skus += len(page)
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    log.info("loading redis from postgres: %d SKUs so far", skus)
            await self.ctx.redis.set_generation(pg_gen, run_id)
            log.info("redis loaded from postgres: %d SKUs in %.1f s", skus,
                     time.monotonic() - start)
        metrics.REDIS_REBUILDS.inc()
        return True

    async def run_pass(self) -> ReconcileReport:
        rebuilt = await self.ensure_generation(startup=False)
        now = time.monotonic()
        mark = await self.ctx.pg.stock_seq_now()  # before anything is read
        window = self.ctx.settings.reconcile_seq_window_s
        usable = [(at, m) for at, m in self._marks if now - at >= window]
        since = usable[-1][1] if usable else None
        # the newest usable mark stays: the next pass may come sooner than the window
        self._marks = usable[-1:] + [(at, m) for at, m in self._marks if now - at < window]
        self._marks.append((now, mark))
        full = (since is None or rebuilt
                or self._passes % self.ctx.settings.reconcile_full_every == 0)
        self._passes += 1
        total = ReconcileReport(0, 0, 0, rebuilt)
        if full:
            after = ""
            while page := await self.ctx.pg.stock_page(after, RECONCILE_PAGE):
                after = max(page)
                total = _add(total, await self.reconcile(sorted(page)))
                await nap(0)  # let waiting RPCs run between rounds
        else:
            assert since is not None
            changed: dict[str, set[str] | None] = dict(await self.ctx.pg.changed_since(since))
            for sku in await self.ctx.redis.skus_with_holds():
                changed[sku] = None  # all its rows: the records may name any of them
            skus = sorted(changed)
            for i in range(0, len(skus), RECONCILE_PAGE):
                round_ = skus[i:i + RECONCILE_PAGE]
                total = _add(total, await self.reconcile(round_, {s: changed[s] for s in round_}))
                await nap(0)
        # Levels behind by seq are routine under load (a commit's update on its way while the
        # pass reads); repairs, rebuilds and orphans are not.
        level = logging.WARNING if total.repaired or rebuilt or total.orphans_released else (
            logging.INFO if total.stale_levels else logging.DEBUG)
        log.log(level, "reconciler (%s pass): %s", "full" if full else "changes", total)
        metrics.observe_reconcile(total, "full" if full else "changes")
        await metrics.refresh_business_gauges(self.ctx)  # once a pass, never per call
        return total

    async def check_holds(self) -> ReconcileReport | None:
        """Reconcile the SKUs whose holds in flight are due to commit by now."""
        now = time.monotonic()
        due = sorted(sku for sku, at in self._watch.items() if at <= now)
        if not due:
            return None
        for sku in due:
            self._watch.pop(sku, None)
        report = await self.reconcile(due)
        metrics.observe_reconcile(report, "holds")
        if report.repaired or report.orphans_released:
            log.warning("reconciler (hold check): %s", report)
        return report

    def next_hold_check(self) -> float | None:
        return min(self._watch.values(), default=None)

    async def reconcile(
        self, skus: list[str], only: dict[str, set[str] | None] | None = None
    ) -> ReconcileReport:
        """One round over these SKUs (see the class doc); with `only`, over those locations of
        each SKU (None: all of them)."""
        redis = self.ctx.redis
        cached, holds, now_ms = await redis.inspect(skus, only)
        ids = sorted({h.id for recs in holds.values() for h in recs})
        whole = [s for s in skus if only is None or only.get(s) is None]
        pairs = [(s, loc) for s in skus for loc in sorted(only.get(s) or ())
                 ] if only is not None else []
        levels, committed = await self._pg_view(whole, pairs, ids)
        # a SKU not in Redis is loaded whole (so only when every row of it was read)
        await redis.load({s: levels.get(s, []) for s in whole if cached[s] is None}, force=False)
        stale: list[StockLevel] = []
        repairs: list[tuple[str, str, str, str]] = []
        for sku in skus:
            if (have_all := cached[sku]) is None:
                continue  # just loaded whole
            in_redis = {c.level.location_id: c for c in have_all}
            recorded: dict[str, int] = defaultdict(int)
            for rec in holds[sku]:
                for loc, qty in rec.units.items():
                    recorded[loc] += qty
            for lv in levels.get(sku, []):
                have = in_redis.get(lv.location_id)
                if have is None or have.level.seq < lv.seq:
                    stale.append(lv)
                elif have.level != lv or have.held != recorded[lv.location_id]:
                    repairs.append((sku, lv.location_id, have.encode(),
                                    encode_level(lv, recorded[lv.location_id])))
        await redis.apply_changes(stale)
        repaired = 0
        for sku, loc, seen, want in repairs:
            log.warning("reconciler: redis had %s@%s = %s, repairing to %s", sku, loc, seen, want)
            repaired += await redis.repair(sku, loc, seen, want)
        orphans: list[tuple[str, HoldRecord]] = []
        young = settled = 0
        for sku in skus:
            if cached[sku] is None:
                continue
            for rec in holds[sku]:
                if rec.id in committed:  # its commit is done; the record was left behind
                    settled += await redis.settle_record(sku, rec.id, levels.get(sku, []))
                    continue
                age_ms = now_ms - rec.created_ms
                if age_ms >= self.orphan_after_ms:
                    orphans.append((sku, rec))
                    continue
                young += 1
                at = time.monotonic() + (self.orphan_after_ms - age_ms) / 1000 + 0.01
                self._watch[sku] = min(self._watch.get(sku, at), at)
        released = await self._release_orphans(orphans)
        return ReconcileReport(len(skus), len(stale), repaired, False, released, young, settled)

    async def _pg_view(
        self, skus: list[str], pairs: list[tuple[str, str]], hold_ids: list[str]
    ) -> tuple[dict[str, list[StockLevel]], set[str]]:
        """All rows of `skus`, the rows `pairs`, and which of these reservations exist, in one
        snapshot."""
        with translate_errors():
            pool, timeout = self.ctx.pg.pool, self.ctx.settings.pg_timeout_s
            async with pool.acquire(timeout=timeout) as conn, conn.transaction(
                    isolation="repeatable_read", readonly=True):
                rows = list(await conn.fetch(
                    STOCK_SELECT + " WHERE s.sku = ANY($1::text[])", skus)) if skus else []
                if pairs:
                    rows += await conn.fetch(
                        STOCK_SELECT + " JOIN unnest($1::text[], $2::text[]) AS k(sku, loc)"
                        " ON s.sku = k.sku AND s.location_id = k.loc",
                        [p[0] for p in pairs], [p[1] for p in pairs])
                found = await conn.fetch(
                    "SELECT id FROM reservations WHERE id = ANY($1::text[])", hold_ids
                ) if hold_ids else []
        return levels_by_sku(rows), {r["id"] for r in found}

    async def _release_orphans(self, orphans: list[tuple[str, HoldRecord]]) -> int:
        """Give back holds whose reservation never reached Postgres. Under the stock rows' locks:
        a commit of one of them still under way holds those locks, and then we wait for it (or
        leave it to the next check when it takes longer)."""
        if not orphans:
            return 0
        keys = sorted({(sku, loc) for sku, rec in orphans for loc in rec.units})
        released = 0
        with translate_errors():
            pool, timeout = self.ctx.pg.pool, self.ctx.settings.pg_timeout_s
            async with pool.acquire(timeout=timeout) as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '500ms'")
                try:
                    locked = await PgStore.lock_stock(conn, keys)
                except asyncpg.LockNotAvailableError:
                    log.info("reconciler: stock of %d orphan holds is busy; next time",
                             len(orphans))
                    for sku, _ in orphans:
                        self._watch[sku] = time.monotonic() + 0.5
                    return 0
                levels: dict[str, list[StockLevel]] = defaultdict(list)
                for row in locked.values():
                    levels[row.level.sku].append(row.level)
                found = {r["id"] for r in await conn.fetch(
                    "SELECT id FROM reservations WHERE id = ANY($1::text[])",
                    [rec.id for _, rec in orphans])}
                for sku, rec in orphans:
                    # committed after all (its commit was under way): settled like any other
                    gave = await self.ctx.redis.settle_record(sku, rec.id, levels.get(sku, []))
                    released += int(gave and rec.id not in found)
        if released:
            log.warning("reconciler: gave back %d orphaned holds", released)
        return released


def _add(a: ReconcileReport, b: ReconcileReport) -> ReconcileReport:
    return ReconcileReport(
        a.skus + b.skus, a.stale_levels + b.stale_levels, a.repaired + b.repaired, a.rebuilt,
        a.orphans_released + b.orphans_released, a.in_flight + b.in_flight,
        a.settled + b.settled)


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
        await nap(max(0.0, wake - time.monotonic()))


async def every(interval_s: float, name: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run `step` forever at a fixed interval; a failed step is logged, never fatal."""
    while True:
        try:
            await step()
        except DomainError as exc:  # e.g. UNAVAILABLE while a store is down: try again later
            log.warning("%s: %s", name, exc.message)
        except Exception:
            log.exception("%s failed", name)
        await nap(interval_s)


async def run_background(ctx: Context, reservations: ReservationService,
                         reconciler: Reconciler, *, lock: int | None = None) -> None:
    """The replica's background tasks, owned by one TaskGroup; cancel it to stop them all.
    With `lock` (an advisory key shared by sibling workers) the sweeper and the reconciler run
    only while this process leads (see `lead`)."""

    async def sweep() -> None:
        # Drain everything that is due, a batch per transaction.
        while (n := await reservations.expire_due()) > 0:
            metrics.EXPIRED.inc(n)
            if n < ctx.settings.sweep_batch:
                break

    keeper = KeyFilterKeeper(ctx)

    async def shared() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(every(ctx.settings.sweep_interval_s, "expiry sweeper", sweep))
            tg.create_task(run_reconciler(ctx, reconciler))
            if keeper.active:
                tg.create_task(every(KEY_FILTER_LOOK_S, "key filter", keeper.step))
            tg.create_task(run_watch_background(ctx))  # stock event sequencer, retention

    async with asyncio.TaskGroup() as tg:
        tg.create_task(shared() if lock is None else lead(ctx.settings, lock, shared))
        tg.create_task(every(5.0, "location refresh", ctx.refresh_locations))


def leader_lock(group: str) -> int:
    """The advisory key the workers of one supervisor (`group`) compete for."""
    return advisory_key(f"inventory:background-leader:{group}")


async def lead(settings: Settings, lock: int, work: Callable[[], Awaitable[None]], *,
               retry_s: float = LEAD_RETRY_S) -> None:
    """Run `work` whenever this process holds the session-level advisory lock `lock`; try for
    it every `retry_s` otherwise. The lock lives on a connection of its own (a pool recycles its
    connections, and a busy pool must not keep the leader from proving it is alive); when that
    connection is lost or stops answering, `work` is cancelled before the next try: whoever
    holds the lock now (its session ended with ours) is the only leader. Until then two may run
    at once for up to `retry_s`, which the background tasks tolerate (see the module doc).
    The connection's application_name, "inventory-svc background pid P", tells in
    pg_stat_activity (joined with pg_locks) which process leads."""
    name = f"inventory-svc background pid {os.getpid()}"
    conn: asyncpg.Connection | None = None
    try:
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(
                        settings.database_url, timeout=settings.pg_timeout_s,
                        server_settings={"application_name": name})
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock,
                                       timeout=settings.pg_timeout_s):
                    log.info("%s leads the background work (sweeper, reconciler)", name)
                    why = await _while_alive(conn, work, retry_s, settings.pg_timeout_s)
                    log.warning("%s stopped its background work: %s", name, why)
                    conn.terminate()  # our session, and with it the lock, ends for sure
                    conn = None
            except Exception as exc:  # Postgres down, refusing, slow: try again later
                log.warning("%s: background leadership: %r", name, exc)
                if conn is not None:
                    conn.terminate()
                    conn = None
            await nap(retry_s)
    finally:
        if conn is not None:
            conn.terminate()  # the server ends the session: the lock is free for another worker


async def _while_alive(conn: asyncpg.Connection, work: Callable[[], Awaitable[None]],
                       check_s: float, timeout_s: float) -> str:
    """Run `work` until `conn` closes or fails a check (one every `check_s`), then cancel it;
    return why it stopped."""
    lost = asyncio.Event()

    def on_close(_: object) -> None:
        lost.set()

    conn.add_termination_listener(on_close)
    task = asyncio.ensure_future(work())
    why = "the work ended"
    try:
        while not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), check_s)
            stop_if_cancelled()  # that wait_for may have swallowed our cancel (see there)
            if lost.is_set():
                why = "its lock connection closed"
                break
            if task.done():
                break
            try:
                await conn.fetchval("SELECT 1", timeout=timeout_s)
            except (OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                why = f"its lock connection failed a check ({exc!r})"
                break
    finally:
        conn.remove_termination_listener(on_close)
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())
    return why
