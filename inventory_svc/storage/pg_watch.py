"""Postgres side of WatchStock (docs/WATCH.md): the sequencer's pass, event and snapshot reads,
and the live cursors retention respects.

Commit order. A trigger on `stock` (migration 0006) writes every change of a row into
`stock_changes` inside the changing transaction. `stock_changes.id` is taken under the row's lock,
so for one row a later change has a larger id; but ids are taken before commit, so a lower id
may commit later and ids alone are no commit order. The sequencer numbers changes only once they
are committed: one pass at a time (the `watch_state` row is its lock) takes every change its
statement can see, i.e. every committed one not numbered yet, deletes it from `stock_changes` and
numbers it after everything numbered before. A change committed later is seen by a later pass
and numbered higher. Within a pass, transactions go in the order of their last change's id (for
one row: the order its changes happened in) and each transaction's changes stay together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from inventory_svc.domain.model import StockLevel
from inventory_svc.domain.watch import EventKind, SnapshotRow, StockEvent

NOTIFY_CHANNEL = "inventory_watch"  # (also named in migration 0008)
# A commit of a process that does not run the sequencer wakes an idle one through this channel
# (SequencerWake; app/sequencer.py listens)
WAKE_CHANNEL = "inventory_watch_wake"

# The pass (migration 0008) numbers in one statement, so one snapshot: the changes it deletes are
# exactly those it can see, and the SKU totals it reads are the stock as those changes left it.
# Changes numbered in one pass at most (whole transactions: one larger than this goes alone). A
# bulk load leaves hundreds of thousands; numbering them in one statement outlasted the
# statement timeout, so no pass ever finished (measured: the demo's 395k rows).
PASS_ROWS = 20_000

log = logging.getLogger(__name__)


class SequencerWake:
    """Wakes an idle sequencer of another process (the background leader of another worker or
    replica) after a commit of this one: a NOTIFY on WAKE_CHANNEL, not awaited by the call that
    committed. Sent only when this process wrote nothing for `after_s` before (0: never): after
    a wake-up, or a pass that found a change, the sequencer keeps its short pause at least that
    long (app/sequencer.py quiet_before_idle_s). A write that changed no stock, just as the
    sequencer went idle, may leave it idle: the next change then waits for the pause to end."""

    def __init__(self, pool: asyncpg.Pool, after_s: float = 0.0) -> None:
        self.pool = pool
        self.after_s = after_s
        self._last_write = -math.inf
        self._sending: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        if self.after_s <= 0:
            return
        now = time.monotonic()
        quiet, self._last_write = now - self._last_write >= self.after_s, now
        if quiet and self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            await self.pool.execute(f"NOTIFY {WAKE_CHANNEL}")
        except Exception as exc:  # (best effort: the idle pause ends anyway)
            log.debug("waking the watch sequencer failed: %r", exc)
        finally:
            self._sending = None

    async def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sending


EVENT_COLUMNS = (
    "seq, kind, sku, location_id, on_hand, reserved, safety, d_on_hand, d_reserved, version,"
    " stock_seq, location_active, sku_remote_before, sku_remote_after, sku_pos_before,"
    " sku_pos_after, reservation_ids, order_refs, committed_at, sequenced_at"
)


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events after a position, in sequence order, read in one snapshot with where the stream
    stood then: `head` the last sequence taken, `oldest` the oldest event still kept (None: no
    event is kept)."""

    events: list[StockEvent]
    head: int
    oldest: int | None


def _us(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


def event_of(r: asyncpg.Record) -> StockEvent:
    return StockEvent(
        seq=r["seq"], kind=EventKind(r["kind"]), sku=r["sku"], location_id=r["location_id"],
        on_hand=r["on_hand"], reserved=r["reserved"], safety_stock=r["safety"],
        on_hand_delta=r["d_on_hand"], reserved_delta=r["d_reserved"], version=r["version"],
        change_seq=r["stock_seq"], location_active=r["location_active"],
        sku_remote=(r["sku_remote_before"], r["sku_remote_after"]),
        sku_pos=(r["sku_pos_before"], r["sku_pos_after"]),
        reservation_ids=tuple(r["reservation_ids"]), order_refs=tuple(r["order_refs"]),
        committed_at_us=_us(r["committed_at"]), sequenced_at_us=_us(r["sequenced_at"]))


def parse_notice(payload: str) -> tuple[int, list[StockEvent] | None]:
    """A sequencer pass's NOTIFY (migration 0008): the last sequence it took, and its events
    when they fitted in the notice (None: read them from stock_events)."""
    head, _, body = payload.partition(" ")
    if not body:
        return int(head), None
    return int(head), [StockEvent(
        seq=e[0], kind=EventKind(e[1]), sku=e[2], location_id=e[3], on_hand=e[4],
        reserved=e[5], safety_stock=e[6], on_hand_delta=e[7], reserved_delta=e[8],
        version=e[9], change_seq=e[10], location_active=e[11], sku_remote=(e[12], e[13]),
        sku_pos=(e[14], e[15]), reservation_ids=tuple(e[16]), order_refs=tuple(e[17]),
        committed_at_us=e[18], sequenced_at_us=e[19]) for e in json.loads(body)]


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one sequencer pass did: `events` numbered (None: another replica's pass held the
    lock), when the earliest of them committed, and the changes left to number when the pass
    was a full one (else 0)."""

    events: int | None
    first_commit: datetime | None = None
    backlog: int = 0


async def sequence_pass(conn: asyncpg.Connection | asyncpg.Pool) -> PassResult:
    """Number the committed changes not numbered yet (the oldest transactions' first, up to
    PASS_ROWS). One round trip: the pass is the function `watch_sequence_pass` (migration 0008),
    which also moves the head and NOTIFYs NOTIFY_CHANNEL (sent at COMMIT, so never before the
    events can be read)."""
    row = await conn.fetchrow("SELECT * FROM watch_sequence_pass($1)", PASS_ROWS)
    assert row is not None
    return PassResult(row["events"], row["first_commit"], int(row["backlog"] or 0))


async def head(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The last sequence taken."""
    return int(await conn.fetchval("SELECT last_seq FROM watch_state WHERE id = 1"))


async def read_events(conn: asyncpg.Connection | asyncpg.Pool, after: int, limit: int,
                      skus: Sequence[str] = ()) -> EventPage:
    """Up to `limit` events after `after` (of these SKUs only, if given), in sequence order."""
    sku_filter = " AND e.sku = ANY($3::text[])" if skus else ""
    args: list[object] = [after, limit] + ([list(skus)] if skus else [])
    rows = await conn.fetch(
        "SELECT h.last_seq AS head, lo.oldest, e.* FROM"
        " (SELECT last_seq FROM watch_state WHERE id = 1) h"
        " CROSS JOIN (SELECT min(seq) AS oldest FROM stock_events) lo"
        f" LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM stock_events e"
        f"  WHERE e.seq > $1{sku_filter} ORDER BY e.seq LIMIT $2) e ON true"
        " ORDER BY e.seq", *args)
    first = rows[0]
    events = [event_of(r) for r in rows if r["seq"] is not None]
    return EventPage(events, int(first["head"]), first["oldest"])


async def snapshot_page(
    conn: asyncpg.Connection | asyncpg.Pool, after: tuple[str, str], limit: int,
    skus: Sequence[str], locations: Sequence[str] | None,
) -> list[SnapshotRow]:
    """The next `limit` stock rows after `after` of these SKUs (all if empty) at these locations
    (all if None). By (sku, location) with SKUs or no filter; by (location, sku) with locations
    only, so a store's terminal reads its own rows through the location index, not the table."""
    cols = (
        "s.sku, s.location_id, s.on_hand, s.reserved,"
        " COALESCE(s.safety_stock, l.default_safety_stock) AS safety, s.version, s.seq, l.active"
        " FROM stock s JOIN locations l ON l.id = s.location_id")
    if skus or locations is None:
        where = ["(s.sku, s.location_id) > ($1, $2)"]
        args: list[object] = [after[0], after[1], limit]
        if skus:
            args.append(list(skus))
            where.append(f"s.sku = ANY(${len(args)}::text[])")
        if locations is not None:
            args.append(list(locations))
            where.append(f"s.location_id = ANY(${len(args)}::text[])")
        order = "s.sku, s.location_id"
    else:
        where = ["(s.location_id, s.sku) > ($2, $1)", "s.location_id = ANY($4::text[])"]
        args = [after[0], after[1], limit, list(locations)]
        order = "s.location_id, s.sku"
    rows = await conn.fetch(
        f"SELECT {cols} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT $3", *args)
    return [SnapshotRow(StockLevel(r["sku"], r["location_id"], r["on_hand"], r["reserved"],
                                   r["safety"], r["version"], r["seq"]), r["active"])
            for r in rows]


async def put_cursor(conn: asyncpg.Connection | asyncpg.Pool, holder: str, seq: int) -> None:
    await conn.execute(
        "INSERT INTO watch_cursors (holder, seq, updated_at) VALUES ($1, $2, now())"
        " ON CONFLICT (holder) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()",
        holder, seq)


async def drop_cursor(conn: asyncpg.Connection | asyncpg.Pool, holder: str) -> None:
    await conn.execute("DELETE FROM watch_cursors WHERE holder = $1", holder)
