"""The WatchStock sequencer (docs/WATCH.md): numbers committed stock changes in commit order
(storage/pg_watch.py explains the order). One pass at a time runs in all the replicas together;
the others skip their turn.

It runs on a thread of its own, with its own event loop and its own connection. On the serving
loop every await of a pass (the sleep, the pool, the answer) waited for the loop's turn behind the
calls being served, and under load that wait, not the pass, was most of an event's lag: a pass
that runs in 1.4 ms on a quiet box took 10 ms at the median and 60 ms at p90 on the loop of a
worker serving 70 % of its maximum (measured with benchmarks/watch_lag.py). A pass's own work is
in Postgres (one function call); the thread only waits on its socket, without the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from inventory_svc.app.context import Context
from inventory_svc.domain.errors import DomainError
from inventory_svc.storage import pg_watch
from inventory_svc.storage.pg_base import translate_errors

log = logging.getLogger(__name__)
NUMBERED = Counter("inventory_watch_events_total", "Stock events numbered by the sequencer")
LAG = Histogram(
    "inventory_watch_lag_seconds",
    "WatchStock lag from commit: stage=sequenced, a pass's earliest change until it was numbered"
    " (one a pass); stage=sent, the last event of a batch a stream took until it was written"
    " (one a batch)", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
BACKLOG = Gauge("inventory_watch_backlog_events",
                "Stock changes committed but not numbered yet (counted after a full pass)",
                multiprocess_mode="livemax")
VACUUM_ROWS, VACUUM_S = 20_000, 10.0  # stock_changes is vacuumed after this many rows or s
RETRY_S = 1.0  # after a failed pass or connection


class Sequencer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._deleted = 0  # stock_changes rows deleted since the last VACUUM of it
        self._vacuumed = time.monotonic()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the thread's
        self._wake: asyncio.Event | None = None  # (of the thread's loop)

    async def run_once(self, conn: asyncpg.Connection | None = None) -> int:
        """One pass, on `conn` or a pooled connection: the events numbered (0 also when another
        replica's pass was running)."""
        with translate_errors():
            if conn is not None:
                return await self._pass(conn)
            async with self.ctx.pg.pool.acquire(timeout=self.ctx.settings.pg_timeout_s) as c:
                return await self._pass(c)

    async def _pass(self, conn: asyncpg.Connection) -> int:
        done = await pg_watch.sequence_pass(conn)
        n = done.events
        if n:
            NUMBERED.inc(n)
            self._deleted += n
            if done.first_commit is not None:
                LAG.labels("sequenced").observe(
                    max(0.0, time.time() - done.first_commit.timestamp()))
        if n is not None:
            BACKLOG.set(done.backlog)
        if self._deleted and (self._deleted >= VACUUM_ROWS or
                              time.monotonic() - self._vacuumed >= VACUUM_S):
            # Every pass scans stock_changes whole, dead rows included, and autovacuum looks at
            # a table once a minute: at 3,000 changes a second a pass would read ~20 MB of dead
            # rows (6 ms, measured) instead of a few pages.
            await conn.execute("VACUUM (SKIP_LOCKED) stock_changes")
            self._deleted, self._vacuumed = 0, time.monotonic()
        return n or 0

    async def run(self) -> None:
        """Passes every watch_sequence_ms on the sequencer's thread until cancelled; then the
        thread ends its pass and its connection before this returns."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def main() -> None:
            try:
                thread_loop = _new_loop()
                try:
                    thread_loop.run_until_complete(self._follow())
                finally:
                    thread_loop.close()
            finally:
                with contextlib.suppress(RuntimeError):  # the serving loop has closed
                    loop.call_soon_threadsafe(_settle, ended)

        threading.Thread(target=main, name="watch-sequencer", daemon=True).start()
        try:
            await asyncio.shield(ended)
            raise RuntimeError("the watch sequencer's thread ended by itself")
        finally:
            self._stop.set()
            if self._loop is not None and self._wake is not None:
                with contextlib.suppress(RuntimeError):  # its loop has closed already
                    self._loop.call_soon_threadsafe(self._wake.set)
            # a pass in flight ends within the statement timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), self.ctx.settings.pg_timeout_s + 1)
            BACKLOG.set(0)  # another process runs it now: this one's last count is not the truth

    async def _follow(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        settings = self.ctx.settings
        conn: asyncpg.Connection | None = None
        try:
            while not self._stop.is_set():
                n, pause = 0, settings.watch_sequence_ms / 1000
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(
                            settings.database_url, timeout=settings.pg_timeout_s,
                            command_timeout=settings.pg_timeout_s,
                            server_settings={"application_name": "inventory-svc sequencer"})
                    n = await self.run_once(conn)
                except DomainError as exc:
                    log.warning("watch sequencer: %s", exc.message)
                    pause = RETRY_S
                except Exception:
                    log.exception("watch sequencer failed")
                    pause = RETRY_S
                if pause == RETRY_S and conn is not None:
                    conn.terminate()
                    conn = None
                if n >= pg_watch.PASS_ROWS // 2:  # behind (a bulk load): the next pass at once
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
        finally:
            if conn is not None:
                conn.terminate()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # (a dependency; the default loop does as well, a little slower)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
