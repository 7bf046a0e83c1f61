"""The WatchStock sequencer (docs/WATCH.md): numbers committed stock changes in commit order
(storage/pg_watch.py explains the order). One pass at a time runs in all the replicas together;
the others skip their turn.

It runs on a thread of its own, with its own event loop and its own connection. On the serving
loop every await of a pass (the sleep, the pool, the answer) waited for the loop's turn behind the
calls being served, and under load that wait, not the pass, was most of an event's lag: a pass
that runs in 1.4 ms on a quiet box took 10 ms at the median and 60 ms at p90 on the loop of a
worker serving 70 % of its maximum (measured with benchmarks/watch_lag.py). A pass's own work is
in Postgres (one function call); the thread only waits on its socket, without the GIL.

After IDLE_AFTER passes in a row that found nothing, the sequencer pauses watch_idle_ms instead
of watch_sequence_ms, until a pass finds events again. An idle service made 100 passes a second,
each a round trip, a Postgres query and a wake-up of this thread (which must take the GIL from
the serving loop): 6-8 % of a core in the service and 2.5 % in Postgres with nothing to do
(measured). While it pauses longer, a commit of this process (PgBase.on_commit) wakes it at once;
a commit of another process that writes after a quiet spell NOTIFYs WAKE_CHANNEL, which this
sequencer's connection listens to (storage/pg_watch.py SequencerWake); a change made outside the
service (a hand-made UPDATE) waits at most watch_idle_ms.
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
from inventory_svc.config import Settings
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
IDLE_AFTER = 5  # passes in a row that found nothing: then the sequencer pauses watch_idle_ms
# A transaction's changes are numbered in one pass, so a bulk load's can outlast the statement
# timeout, and then no pass would ever finish: after a pass is cut off at its timeout, the next
# gets twice as long, up to this many times pg_timeout_s, and once one finishes, the usual time.
PASS_TIMEOUT_GROWTH_MAX = 32
PAUSE = Gauge("inventory_watch_sequencer_pause_seconds",
              "The WatchStock sequencer's pause before its next pass (longer once passes find"
              " nothing)", multiprocess_mode="livemax")
# Who holds the turn (the watch_state row: a pass locks it FOR UPDATE, which shows in pg_locks as
# a RowShareLock on the table; readers take AccessShareLock only), for how long, what it waits for
# and who holds that: for the WARNING that names it
HOLDER_QUERY = """
SELECT a.pid, a.application_name, a.state, a.wait_event_type, a.wait_event,
       extract(epoch FROM now() - a.xact_start)::float8 AS running_s, left(a.query, 120) AS query,
       (SELECT string_agg(format('pid %s (%s, %s, in a transaction for %s s): %s', b.pid,
                                 b.application_name, b.state,
                                 round(extract(epoch FROM now() - b.xact_start)::numeric, 1),
                                 left(b.query, 120)), '; ')
        FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(a.pid))) AS blockers
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = 'watch_state'::regclass AND l.granted
  AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.pid <> pg_backend_pid()
ORDER BY a.xact_start LIMIT 1
"""


def quiet_before_idle_s(settings: Settings) -> float:
    """How long, at least, the sequencer keeps its short pause after a wake-up: IDLE_AFTER
    passes, watch_sequence_ms apart. A process that wrote within that long needs not wake it
    again. 0 when it never pauses longer (watch_idle_ms not above watch_sequence_ms)."""
    if settings.watch_idle_ms <= settings.watch_sequence_ms:
        return 0.0
    return (IDLE_AFTER - 1) * settings.watch_sequence_ms / 1000


class Sequencer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._deleted = 0  # stock_changes rows deleted since the last VACUUM of it
        self._vacuumed = time.monotonic()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the thread's
        self._turn_lost_at: float | None = None  # since when others' passes held every turn
        self._warned_at = 0.0
        self._wake: asyncio.Event | None = None  # (of the thread's loop)
        self._pass_timeout_s = ctx.settings.pg_timeout_s  # what the next connection's pass gets
        # nudge(), from the serving loop (or a NOTIFY on this thread's): commits seen, and
        # whether the thread pauses longer than watch_sequence_ms (then a nudge wakes it).
        # Plain attributes: the GIL orders them.
        self._nudges = 0
        self._pausing_long = False

    def _woken(self, *_: object) -> None:
        """A NOTIFY on WAKE_CHANNEL: another process committed. A nudge like this process's
        own, so one that comes during a pass keeps the next pause short too."""
        self.nudge()

    @property
    def idle(self) -> bool:
        """Whether it pauses watch_idle_ms now (until a commit of the service wakes it)."""
        return self._pausing_long

    def nudge(self) -> None:
        """A commit of this process may have changed stock: a long pause ends now. Called on
        the serving loop after every write (PgBase.committed), so it costs an increment unless
        the sequencer is idle."""
        self._nudges += 1
        if self._pausing_long:
            self._pausing_long = False
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None:
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    loop.call_soon_threadsafe(wake.set)

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
        if n is None:
            await self._held_elsewhere(conn)
        else:
            self._turn_lost_at = None
            BACKLOG.set(done.backlog)
        if self._deleted and (self._deleted >= VACUUM_ROWS or
                              time.monotonic() - self._vacuumed >= VACUUM_S):
            # Every pass scans stock_changes whole, dead rows included, and autovacuum looks at
            # a table once a minute: at 3,000 changes a second a pass would read ~20 MB of dead
            # rows (6 ms, measured) instead of a few pages.
            await conn.execute("VACUUM (SKIP_LOCKED) stock_changes")
            self._deleted, self._vacuumed = 0, time.monotonic()
        return n or 0

    async def _held_elsewhere(self, conn: asyncpg.Connection) -> None:
        """Another pass has the turn. A pass ends within the statement timeout (each sequencer's
        connection sets it in Postgres, so it holds even when that sequencer's process is gone);
        whatever holds every turn for longer stops every stream of every replica, and is named
        in a WARNING (once a minute) with what it waits for."""
        now = time.monotonic()
        if self._turn_lost_at is None:
            self._turn_lost_at = now
            return
        if now - self._turn_lost_at < 2 * self.ctx.settings.pg_timeout_s or \
                now - self._warned_at < 60.0:
            return
        self._warned_at = now
        holder = await conn.fetchrow(HOLDER_QUERY)
        log.warning(
            "watch sequencer: the turn (the watch_state row) has been held elsewhere for %.0f s,"
            " so no stock event is numbered: %s", now - self._turn_lost_at,
            "it has ended meanwhile" if holder is None else
            f"pid {holder['pid']} ({holder['application_name'] or 'no name'}), in a transaction"
            f" for {holder['running_s']:.1f} s, {holder['state']}, waiting for"
            f" {holder['wait_event_type'] or 'nothing'}/{holder['wait_event'] or '-'}, last"
            f" statement {holder['query']!r}; blocked by: {holder['blockers'] or 'nobody'}")

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
        busy_s = settings.watch_sequence_ms / 1000
        idle_s = max(busy_s, settings.watch_idle_ms / 1000)
        empty = 0  # passes in a row that found nothing
        shown = -1.0  # the pause PAUSE shows
        try:
            while not self._stop.is_set():
                n, seen, failed = 0, self._nudges, False
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(
                            settings.database_url, timeout=settings.pg_timeout_s,
                            command_timeout=self._pass_timeout_s,
                            server_settings={
                                "application_name": "inventory-svc sequencer",
                                # Postgres ends a pass that outlives it even when this process
                                # is gone and cannot cancel it: a pass holds every sequencer's
                                # turn while it runs
                                "statement_timeout": str(int(self._pass_timeout_s * 1000)),
                            })
                        await conn.add_listener(pg_watch.WAKE_CHANNEL, self._woken)
                    n = await self.run_once(conn)
                    if self._pass_timeout_s > settings.pg_timeout_s:  # the long pass is done
                        self._pass_timeout_s = settings.pg_timeout_s
                        conn.terminate()  # the next connection has the usual timeout
                        conn = None
                except DomainError as exc:
                    log.warning("watch sequencer: %s", exc.message)
                    failed = True
                    if isinstance(exc.__cause__, asyncpg.QueryCanceledError | TimeoutError):
                        self._pass_timeout_s = min(
                            2 * self._pass_timeout_s,
                            PASS_TIMEOUT_GROWTH_MAX * settings.pg_timeout_s)
                except Exception:
                    log.exception("watch sequencer failed")
                    failed = True
                if failed and conn is not None:
                    conn.terminate()
                    conn = None
                empty = 0 if n or failed else empty + 1
                if n >= pg_watch.PASS_ROWS // 2:  # behind (a bulk load): the next pass at once
                    continue
                long = not failed and empty >= IDLE_AFTER and idle_s > busy_s
                pause = RETRY_S if failed else idle_s if long else busy_s
                if long:
                    self._pausing_long = True
                    if self._nudges != seen:  # a commit since this pass began: look again soon
                        self._pausing_long, pause, empty = False, busy_s, 0
                if pause != shown:
                    PAUSE.set(shown := pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
                    # Woken by a commit: the short pause for IDLE_AFTER passes, so that the
                    # writer's next commits within quiet_before_idle_s need not wake it again
                    empty = 0
                self._pausing_long = False
                if not self._stop.is_set():
                    self._wake.clear()
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
