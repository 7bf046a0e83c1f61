"""The per-process side of WatchStock: one follower of the event table for all the streams this
process serves (docs/WATCH.md).

The hub LISTENs for the sequencer's NOTIFY (and looks anyway every watch_poll_s, in case a
notification was lost with its connection), reads the new events once, keeps the latest
`watch_ring` of them in memory, and wakes the streams. Each stream pulls what it wants from that
ring at its own pace, or from Postgres when it is further behind, so no stream ever waits for
another and the hub never waits for any. The hub also records where its streams stand
(watch_cursors), so retention keeps what they still need, and cuts off a stream whose consumer
stopped reading (see `WatchStreamState.blocked_at`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import Counter, Gauge

from inventory_svc.app.cancelling import nap, stop_if_cancelled
from inventory_svc.app.context import Context
from inventory_svc.domain.errors import DomainError, ResourceExhausted, Unavailable
from inventory_svc.domain.watch import StockEvent
from inventory_svc.storage import pg_watch
from inventory_svc.storage.pg_base import translate_errors

log = logging.getLogger(__name__)
PAGE = 1_000  # events a read takes at most
STREAMS = Gauge("inventory_watch_streams", "WatchStock streams open in this process",
                multiprocess_mode="livesum")
CUT_OFF = Counter("inventory_watch_cut_off_total",
                  "WatchStock streams cut off: their consumer stopped reading")


@dataclass(eq=False, slots=True)
class WatchStreamState:
    """What the hub knows of one open stream (the stream itself is app/watch.py's)."""

    task: asyncio.Task[object]  # the call's task: cancelled to cut the stream off
    position: int  # every event up to here has been looked at for this stream
    live: bool = False  # it has been at the head once: from now on it must keep up
    # The head when the write the stream waits in began (None: not writing), and which write
    # that is. A write waits only when the consumer's HTTP/2 window is full, i.e. it stopped
    # taking messages. A stream still in the same write at two reads of new events, with more
    # than `watch_buffer` events taken since the write began, is cut off: counted in events and
    # reads, not seconds, so it does not depend on how fast anything runs.
    blocked_at: int | None = None
    writes: int = 0
    seen_waiting: int = -1  # the write the hub saw waiting at its last read
    sent: int = 0  # the last sequence the consumer was sent
    cut_error: DomainError | None = None  # why the hub ended it


@dataclass(slots=True)
class _Ring:
    """The latest events, contiguous by sequence: events[i].seq == floor + 1 + i."""

    floor: int = 0
    events: list[StockEvent] = field(default_factory=list)

    @property
    def head(self) -> int:
        return self.floor + len(self.events)

    def after(self, position: int, limit: int) -> list[StockEvent]:
        start = position - self.floor
        return self.events[start:start + limit]

    def extend(self, events: Sequence[StockEvent], keep: int) -> None:
        self.events.extend(events)
        if len(self.events) > 2 * keep:  # trimmed now and then: amortised O(1) an event
            cut = len(self.events) - keep
            del self.events[:cut]
            self.floor += cut

    def restart(self, head: int) -> None:
        self.events.clear()
        self.floor = head


class WatchHub:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.streams: set[WatchStreamState] = set()
        self._ring = _Ring()
        self._moved = asyncio.Condition()
        self._kick = asyncio.Event()
        self._notices: list[str] = []  # NOTIFY payloads not applied yet
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def head(self) -> int:
        """The last sequence this process has read."""
        return self._ring.head

    @property
    def floor(self) -> int:
        """Events after this one (up to the head) are in memory."""
        return self._ring.floor

    def after(self, position: int, limit: int = PAGE) -> list[StockEvent]:
        """In-memory events after `position` (which must be >= floor)."""
        return self._ring.after(position, limit)

    async def start(self) -> None:
        """Start following the events (once; later calls wait for the first)."""
        if self._closed:
            raise Unavailable("the service is shutting down; resume on another replica")
        if self._task is not None and self._task.done() and self._ready is not None:
            # it ended by a bug (it logged it): its streams would wait for ever; start anew
            self._ready = None
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name="watch hub")
        await asyncio.shield(self._ready)

    def add(self, state: WatchStreamState) -> None:
        limit = self.ctx.settings.watch_max_streams
        if len(self.streams) >= limit:
            raise ResourceExhausted(
                f"this replica serves its limit of {limit} WatchStock streams; retry on another"
                " or later", subject="service/watch_max_streams", retry_after_s=1.0)
        self.streams.add(state)
        STREAMS.inc()

    def remove(self, state: WatchStreamState) -> None:
        if state in self.streams:
            self.streams.discard(state)
            STREAMS.dec()

    async def wait_beyond(self, position: int, timeout_s: float) -> bool:
        """Wait until the head passes `position`: False if `timeout_s` went by first."""
        async with self._moved:
            try:
                await asyncio.wait_for(self._moved.wait_for(lambda: self.head > position),
                                       timeout_s)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        """End every stream (UNAVAILABLE, naming where to resume) and stop following."""
        self._closed = True
        for s in list(self.streams):
            self._end(s, Unavailable(
                "the service is shutting down: resume with after_sequence set to the last"
                f" sequence you received (this replica had sent up to {s.sent})"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _end(self, s: WatchStreamState, why: DomainError) -> None:
        if s.cut_error is None:
            s.cut_error = why
            s.task.cancel()
        self.remove(s)

    async def _run(self) -> None:
        """Follow the events until cancelled; reconnect when the listening connection fails."""
        assert self._ready is not None
        cursors = asyncio.create_task(self._keep_cursors())
        conn: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(
                            self.ctx.settings.database_url, timeout=self.ctx.settings.pg_timeout_s,
                            server_settings={"application_name": f"inventory-svc watch {self.holder}"})
                        await conn.add_listener(pg_watch.NOTIFY_CHANNEL, self._notified)
                        if not self._ready.done():
                            # a new stream starts at the head of Postgres, not of an old ring
                            with translate_errors():
                                self._ring.restart(await pg_watch.head(self.ctx.pg.pool))
                            self._ready.set_result(None)
                    await self._read_new()
                except Exception as exc:
                    if isinstance(exc, (DomainError, OSError, asyncpg.PostgresError,
                                        asyncpg.InterfaceError)):
                        log.warning("watch: following the events failed, retrying: %r", exc)
                    else:  # a bug: the streams of this process must not stop for it
                        log.exception("watch: following the events failed, retrying")
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    if not self._ready.done():
                        self._ready.set_exception(Unavailable(f"postgres unavailable: {exc!r}"))
                        self._ready = None  # the next stream tries again
                        return
                    await nap(min(1.0, self.ctx.settings.watch_poll_s))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.ctx.settings.watch_poll_s)
                stop_if_cancelled()  # that wait_for may have swallowed our cancel
                self._kick.clear()
        finally:
            cursors.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cursors
            if conn is not None:
                conn.terminate()
            with contextlib.suppress(DomainError, asyncpg.PostgresError), translate_errors():
                await pg_watch.drop_cursor(self.ctx.pg.pool, self.holder)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._notices.append(payload)
        self._kick.set()

    def _apply_notices(self) -> bool:
        """Add the events the sequencer's notices carried to the ring: False if any notice
        left a gap (it carried no events, or one was missed) that a read must fill."""
        notices, self._notices = self._notices, []
        if not notices:
            return False  # woken by the poll, not a notice: look in Postgres
        for payload in notices:
            try:
                last, events = pg_watch.parse_notice(payload)
            except (ValueError, KeyError, IndexError, TypeError):
                log.warning("watch: a notice the hub cannot read: %.80r", payload)
                return False
            if last <= self._ring.head:
                continue
            if not events or events[0].seq != self._ring.head + 1 or events[-1].seq != last:
                return False
            self._ring.extend(events, self.ctx.settings.watch_ring)
        return True

    async def _read_new(self) -> None:
        """Take what was numbered since the head: from the sequencer's notices when they
        carried it, else from Postgres; the latest `watch_ring` events at most (a bulk import of
        a million rows is read by the streams that want it, from Postgres)."""
        before = self._ring.head
        if self._apply_notices():
            if self._ring.head > before:
                self._cut_stalled()
                async with self._moved:
                    self._moved.notify_all()
            return
        keep = self.ctx.settings.watch_ring
        while True:
            with translate_errors():
                page = await pg_watch.read_events(self.ctx.pg.pool, self._ring.head, PAGE)
            if page.head - self._ring.head > keep + PAGE:
                self._ring.restart(page.head - keep)
                continue
            if page.events:
                self._ring.extend(page.events, keep)
                self._cut_stalled()
                async with self._moved:
                    self._moved.notify_all()
            if len(page.events) < PAGE:
                return

    def _cut_stalled(self) -> None:
        buffer = self.ctx.settings.watch_buffer
        for s in list(self.streams):
            if not s.live or s.blocked_at is None:
                continue
            if s.seen_waiting != s.writes:  # a write seen for the first time: it may just be
                s.seen_waiting = s.writes  # on its way
                continue
            if self.head - s.blocked_at > buffer:
                CUT_OFF.inc()
                log.info("watch: cutting off a stream that stopped reading (sent up to %d, head"
                         " %d)", s.sent, self.head)
                self._end(s, ResourceExhausted(
                    f"the consumer stopped reading: more than {buffer} events were taken while"
                    " a message to it waited; resume with after_sequence set to the last"
                    f" sequence you received (this stream had sent up to {s.sent})",
                    subject="watch/buffer"))

    async def _keep_cursors(self) -> None:
        """Tell retention where this process's streams stand, every watch_cursor_interval_s."""
        had = False
        while True:
            await nap(self.ctx.settings.watch_cursor_interval_s)
            try:
                await self.save_cursors(had)
                had = bool(self.streams)
            except DomainError as exc:
                log.warning("watch: saving stream cursors failed: %s", exc.message)

    async def save_cursors(self, drop_if_idle: bool = True) -> None:
        """Record the lowest position of this process's streams now (none: drop the row)."""
        with translate_errors():
            if self.streams:
                await pg_watch.put_cursor(self.ctx.pg.pool, self.holder,
                                          min(s.position for s in self.streams))
            elif drop_if_idle:
                await pg_watch.drop_cursor(self.ctx.pg.pool, self.holder)
