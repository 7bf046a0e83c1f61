"""WatchStock (docs/WATCH.md): the sequencer that numbers committed stock changes in commit
order, and the streams that serve them to channels, ERP/WMS and caches.

A stream starts at the head (new events only), after a sequence a consumer saw (resume), or with
a snapshot of the stock it asks for; then it follows the events: from the process's in-memory
ring (app/watch_hub.py) when it is near the head, from Postgres when it is further behind, at its
consumer's pace. Heartbeats say how far it has looked while nothing matches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter

from inventory_svc.app.context import Context
from inventory_svc.app.retention import Retention
from inventory_svc.app.sequencer import LAG, Sequencer
from inventory_svc.app.watch_hub import PAGE, WatchHub, WatchStreamState
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import DomainError, FailedPrecondition
from inventory_svc.domain.watch import (
    Delivery,
    DeliveryBatch,
    Heartbeat,
    SnapshotPage,
    SnapshotRow,
    StockEvent,
    WatchFilter,
)
from inventory_svc.storage import pg_watch
from inventory_svc.storage.pg_base import translate_errors

log = logging.getLogger(__name__)
SENT = Counter("inventory_watch_events_sent_total", "Stock events sent to WatchStock streams")
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 0.1, 600.0
MAX_PER_MESSAGE = PAGE  # events in one message at most (a read's worth)
Item = Delivery | DeliveryBatch | SnapshotPage | Heartbeat


@dataclass(frozen=True, slots=True)
class WatchStart:
    """Where a stream starts: after a sequence (resume), with a snapshot, or (neither) at the
    head; and how often it sends a heartbeat when it has nothing else to send."""

    after_sequence: int | None = None
    snapshot: bool = False
    heartbeat_s: float = 0.0  # 0: the service's default
    per_message: int = 1  # events a message at most (more than 1: DeliveryBatch items)


def cursor_error(position: int, page: pg_watch.EventPage) -> FailedPrecondition | None:
    """Why a stream cannot go on from `position`: it is ahead of every event (another
    database's, or one restored from a backup), or the events after it were deleted."""
    if position > page.head:
        return FailedPrecondition(
            f"after_sequence {position} is ahead of the stream (its last sequence is"
            f" {page.head}): take a snapshot", violation_type="CURSOR_AHEAD",
            subject="after_sequence")
    if position < page.head and (page.oldest is None or page.oldest > position + 1):
        oldest = page.head + 1 if page.oldest is None else page.oldest
        return FailedPrecondition(
            f"the events after sequence {position} are past their retention (the oldest kept"
            f" is {oldest}): take a snapshot (WatchStockRequest.snapshot) and follow from there",
            violation_type="CURSOR_EXPIRED", subject="after_sequence")
    return None


class WatchStream:
    """One open WatchStock call. `items()` is what to send; when the hub ends the stream (its
    consumer stopped reading, or the service is shutting down) it cancels the call's task and
    `cut_error` says what to answer."""

    def __init__(self, service: WatchService, filt: WatchFilter, start: WatchStart,
                 state: WatchStreamState) -> None:
        self.ctx = service.ctx
        self.hub = service.hub
        self.filter = filt
        self.start = start
        self.state = state
        s = self.ctx.settings
        self.heartbeat_s = start.heartbeat_s or s.watch_heartbeat_s

    @property
    def cut_error(self) -> DomainError | None:
        return self.state.cut_error

    async def items(self) -> AsyncGenerator[Item, None]:
        st = self.state
        try:
            if self.start.snapshot:
                with translate_errors():
                    st.position = await pg_watch.head(self.ctx.pg.pool)
                async for page in self._snapshot(st.position):
                    st.blocked_at, st.writes = self.hub.head, st.writes + 1
                    yield page
                    st.blocked_at = None
            elif self.start.after_sequence is not None:
                st.position = self.start.after_sequence
                with translate_errors():
                    first = await pg_watch.read_events(self.ctx.pg.pool, st.position, 1)
                if (err := cursor_error(st.position, first)) is not None:
                    raise err
            else:
                with translate_errors():  # from now: after the last event numbered
                    st.position = await pg_watch.head(self.ctx.pg.pool)
            async for item in self._follow():
                st.blocked_at, st.writes = self.hub.head, st.writes + 1
                yield item
                st.blocked_at = None
                if isinstance(item, Delivery):
                    st.sent = item.event.seq
                    SENT.inc()
                elif isinstance(item, DeliveryBatch):
                    st.sent = item.deliveries[-1].event.seq
                    SENT.inc(len(item.deliveries))
        finally:
            self.hub.remove(st)

    async def _follow(self) -> AsyncIterator[Item]:
        """Events after the position, then heartbeats and events as they come."""
        st, hub = self.state, self.hub
        last_sent = time.monotonic()
        while True:
            if st.position < hub.head:
                if st.position >= hub.floor:
                    batch = hub.after(st.position)
                    covered = batch[-1].seq
                else:
                    batch, covered = await self._read(st.position)
                async for item in self._deliveries(batch):
                    yield item  # back here once it is written
                    last_sent = time.monotonic()
                st.position = max(st.position, covered)
                if time.monotonic() - last_sent >= self.heartbeat_s:
                    yield self._heartbeat()
                    last_sent = time.monotonic()
                continue
            # at the head: from now on it must keep up (cut off past watch_buffer)
            st.live = True
            if not await hub.wait_beyond(st.position, self.heartbeat_s):
                yield self._heartbeat()
                last_sent = time.monotonic()

    async def _deliveries(self, batch: list[StockEvent]) -> AsyncIterator[Item]:
        """What the filter passes of `batch`: a Delivery a message, or (per_message > 1) up to
        per_message of them a DeliveryBatch. The position moves past an event only once the
        message that carries it (if any) is written."""
        st = self.state
        together = self.start.per_message > 1
        limit = self.start.per_message if together else 1
        waiting: list[Delivery] = []
        got: Delivery | None = None
        for ev in batch:
            got = self.filter.deliver(ev)
            if got is not None:
                waiting.append(got)
                if len(waiting) == limit:
                    yield DeliveryBatch(tuple(waiting)) if together else got
                    waiting = []
            if not waiting:
                st.position = ev.seq
        if waiting:
            yield DeliveryBatch(tuple(waiting))
            st.position = batch[-1].seq
        # the lag of the read's last event, if it was sent (once a read: a metric per event
        # would cost more)
        if got is not None:
            LAG.labels("sent").observe(max(0.0, time.time() - batch[-1].committed_at_us / 1e6))

    async def _read(self, position: int) -> tuple[list[StockEvent], int]:
        """Events after `position` from Postgres (only the filter's SKUs, if it names some),
        and how far they cover."""
        with translate_errors():
            page = await pg_watch.read_events(self.ctx.pg.pool, position, PAGE,
                                              sorted(self.filter.skus))
        if (err := cursor_error(position, page)) is not None:
            raise err
        covered = page.events[-1].seq if len(page.events) == PAGE else page.head
        return page.events, covered

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(self.state.position, max(self.hub.head, self.state.position),
                         int(time.time() * 1_000_000))

    async def _snapshot(self, sequence: int) -> AsyncIterator[SnapshotPage]:
        """The stock the filter covers, a page at a time, each page read on its own (no long
        transaction holds the database back). A row changed while the pages are read is in a
        later event too, with a larger change_seq: consumers keep the larger (docs/WATCH.md)."""
        f = self.filter
        locations: list[str] | None = None
        if f.locations or f.location_prefix or f.scope is not None:
            await self.ctx.refresh_locations()
            locations = sorted(x for x in self.ctx.locations if f.location_ok(x))
        after = ("", "")
        while True:
            rows: list[SnapshotRow] = []
            if locations != []:
                with translate_errors():
                    rows = await pg_watch.snapshot_page(self.ctx.pg.pool, after, PAGE,
                                                        sorted(f.skus), locations)
            done = len(rows) < PAGE
            yield SnapshotPage(tuple(rows), sequence, done)
            if done:
                return
            last = rows[-1].level
            after = (last.sku, last.location_id)


class WatchService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.hub = WatchHub(ctx)

    async def open(self, filt: WatchFilter, start: WatchStart) -> WatchStream:
        """A stream for the calling task (validated; the hub started)."""
        v = val.Violations()
        if start.heartbeat_s and not MIN_HEARTBEAT_S <= start.heartbeat_s <= MAX_HEARTBEAT_S:
            v.add("heartbeat_ms", f"{start.heartbeat_s * 1000:g} must be 0 (the service's"
                  f" default) or between {MIN_HEARTBEAT_S * 1000:g} and {MAX_HEARTBEAT_S * 1000:g}")
        if not 0 <= start.per_message <= MAX_PER_MESSAGE:
            v.add("max_events_per_message", f"{start.per_message} must be 0 to {MAX_PER_MESSAGE}")
        v.raise_if_any()
        await self.hub.start()
        task = asyncio.current_task()
        assert task is not None
        state = WatchStreamState(task, start.after_sequence or 0)
        self.hub.add(state)
        return WatchStream(self, filt, start, state)

    async def close(self) -> None:
        await self.hub.close()


async def run_watch_background(ctx: Context) -> None:
    """The sequencer and retention, until cancelled: the background leader runs them
    (app/background.py); with several replicas each pod's leader does, which is safe (one
    sequencer pass at a time, retention skips what another holds) and keeps events flowing
    while a leader is replaced."""
    sequencer = Sequencer(ctx)
    ctx.pg.on_commit = sequencer.nudge  # this process's commits end an idle pause at once
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sequencer.run())
            tg.create_task(Retention(ctx).run())
    finally:
        ctx.pg.on_commit = None
