"""Retention (docs/WATCH.md §Retention): what would otherwise grow forever is deleted after a
window. Run by the background leader (app/background.py) every retention_interval_s:

| what | deleted when | default |
|---|---|---|
| idempotency records | older than retain_idempotency_h (a repeat after that runs again) | 72 h |
| stock events (WatchStock) | older than retain_events_h and passed by every live stream | 7 days |
| outbox rows | older than retain_outbox_h (and no longer needed by the sequencer) | 7 days |
| ended reservations, their lines | ended longer than retain_reservations_h ago | 90 days |
| capacity_usage rows | day over retain_capacity_days ago and no ACTIVE reservation holds it | 35 days |
| stream cursors | not refreshed by their process (killed) for a while | 10 x watch_cursor_interval_s |

Each batch (retention_batch rows) is its own short transaction that skips rows anyone holds and
gives up rather than wait on a lock, with a pause between batches: the hot path never waits for
retention, and retention catches up over as many batches as it needs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from prometheus_client import Counter

from inventory_svc.app.cancelling import nap
from inventory_svc.app.context import Context
from inventory_svc.domain.errors import DomainError
from inventory_svc.storage import pg_retention
from inventory_svc.storage.pg_base import translate_errors

log = logging.getLogger(__name__)
_DELETED = Counter("inventory_retention_deleted_total", "Rows retention deleted", ["table"])
# one series a table, made here so each is exported at 0 from the start (the first run is an
# interval away) and a dashboard's rate() has it from the first scrape
DELETED = {table: _DELETED.labels(table) for table in (
    "idempotency", "stock_events", "outbox", "reservations", "capacity_usage")}
PAUSE_S = 0.01  # between batches: the serving paths' statements go in between
HOUR_S = 3600.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetentionReport:
    idempotency: int = 0
    events: int = 0
    outbox: int = 0
    reservations: int = 0
    cursors: int = 0
    capacity: int = 0


class Retention:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @property
    def cursor_stale_s(self) -> float:
        """A stream cursor not refreshed for this long belongs to a process that is gone."""
        return 10 * self.ctx.settings.watch_cursor_interval_s

    async def run_once(self) -> RetentionReport:
        s = self.ctx.settings
        batch = s.retention_batch
        cursors = await self._batch(lambda c: pg_retention.purge_cursors(c, self.cursor_stale_s))
        await self._batch(pg_retention.summarize_idempotency)
        idem = await self._drain("idempotency", lambda c: pg_retention.purge_idempotency(
            c, s.retain_idempotency_h * HOUR_S, batch))
        events = await self._drain("stock_events", lambda c: pg_retention.purge_events(
            c, s.retain_events_h * HOUR_S, batch, self.cursor_stale_s))
        outbox = await self._drain("outbox", lambda c: pg_retention.purge_outbox(
            c, s.retain_outbox_h * HOUR_S, batch))
        reservations = 0
        after: str | None = ""
        while after is not None:
            n, after = await self._batch(functools.partial(
                pg_retention.purge_reservations, window_s=s.retain_reservations_h * HOUR_S,
                batch=batch, after_id=after))
            reservations += n
            await nap(PAUSE_S)
        DELETED["reservations"].inc(reservations)
        capacity = await self._drain("capacity_usage", lambda c: pg_retention.purge_capacity(
            c, s.retain_capacity_days, batch))
        report = RetentionReport(idem, events, outbox, reservations, cursors, capacity)
        if any((idem, events, outbox, reservations, cursors, capacity)):
            log.info("retention: deleted %s", report)
        return report

    async def run(self) -> None:
        """A run every retention_interval_s until cancelled, the first one interval after the
        start (a start has enough to do, and nothing aged while the service was down that one
        interval more would harm); a failed run is logged."""
        while True:
            await nap(self.ctx.settings.retention_interval_s)
            try:
                await self.run_once()
            except DomainError as exc:
                log.warning("retention: %s", exc.message)
            except Exception:
                log.exception("retention failed")

    async def _drain(self, table: str, step: Callable[[asyncpg.Connection], Awaitable[int]]
                     ) -> int:
        """Batches of `step` until one deletes less than a whole batch."""
        total = 0
        while True:
            n = await self._batch(step)
            total += n
            DELETED[table].inc(n)
            if n < self.ctx.settings.retention_batch:
                return total
            await nap(PAUSE_S)

    async def _batch(self, step: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One step in its own transaction, which never waits long for a lock."""
        with translate_errors():
            async with self.ctx.pg.pool.acquire(timeout=self.ctx.settings.pg_timeout_s) as conn, \
                    conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '100ms'")
                return await step(conn)
