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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from inventory_svc.domain.model import StockLevel
from inventory_svc.domain.watch import EventKind, SnapshotRow, StockEvent

NOTIFY_CHANNEL = "inventory_watch"

# One statement, so one snapshot: the changes it deletes are exactly those it can see, and the
# SKU totals it reads are the stock as those changes left it.
# Changes numbered in one pass at most (whole transactions: one larger than this goes alone). A
# bulk load leaves hundreds of thousands; numbering them in one statement outlasted the
# statement timeout, so no pass ever finished (measured: the demo's 395k rows).
PASS_ROWS = 20_000

_SEQUENCE = """
WITH txns AS (
    SELECT xid, max(id) AS last_id, count(*) AS n FROM stock_changes GROUP BY xid
),
picked AS (
    SELECT xid FROM (
        SELECT xid, sum(n) OVER (ORDER BY last_id) AS upto,
               row_number() OVER (ORDER BY last_id) AS k
        FROM txns) w
    WHERE upto <= $2::bigint OR k = 1
),
pend AS (
    DELETE FROM stock_changes WHERE xid IN (SELECT xid FROM picked) RETURNING *
),
-- a location's active flag or default safety stock changed: count the SKU totals anew
reset AS (SELECT EXISTS (SELECT 1 FROM pend WHERE sku = '') AS yes),
chg AS (SELECT * FROM pend WHERE sku <> ''),
txn AS (
    SELECT xid, max(id) AS last_id,
           COALESCE(CASE WHEN current_setting('track_commit_timestamp')::bool
                         THEN pg_xact_commit_timestamp(xid(xid)) END,
                    max(changed_at)) AS committed_at
    FROM chg GROUP BY xid
),
num AS (
    SELECT c.*, t.committed_at, $1::bigint + row_number() OVER (ORDER BY t.last_id, c.id) AS seq
    FROM chg c JOIN txn t USING (xid)
),
-- the ledger rows of those transactions: what moved on_hand, and for which sale
mv AS (
    SELECT m.xid, m.sku, m.location_id, array_agg(DISTINCT m.kind) AS kinds,
           array_remove(array_agg(DISTINCT m.reservation_id), '') AS rids,
           array_remove(array_agg(DISTINCT m.order_ref), '') AS refs
    FROM movements m WHERE m.xid IN (SELECT xid FROM txn)
    GROUP BY m.xid, m.sku, m.location_id
),
-- the reservations those transactions made or ended, at the rows they hold
rs AS (
    SELECT o.xid, rl.sku, rl.location_id, array_agg(DISTINCT o.payload->>'status') AS statuses,
           array_agg(DISTINCT rl.reservation_id) AS rids,
           array_remove(array_agg(DISTINCT r.order_ref), '') AS refs
    FROM outbox o
    JOIN reservation_lines rl ON rl.reservation_id = o.payload->>'reservation_id'
    JOIN reservations r ON r.id = rl.reservation_id
    WHERE o.xid IN (SELECT xid FROM txn) AND o.kind = 'RESERVATION'
    GROUP BY o.xid, rl.sku, rl.location_id
),
ev AS (
    SELECT n.*, l.active, mv.kinds, rs.statuses,
           CASE WHEN l.active THEN GREATEST(n.on_hand - n.reserved - n.safety, 0)
                - GREATEST(n.old_on_hand - n.old_reserved - n.old_safety, 0) ELSE 0 END AS d_remote,
           CASE WHEN l.active THEN GREATEST(n.on_hand - n.reserved, 0)
                - GREATEST(n.old_on_hand - n.old_reserved, 0) ELSE 0 END AS d_pos,
           ARRAY(SELECT DISTINCT x FROM unnest(COALESCE(mv.rids, '{}') || COALESCE(rs.rids, '{}'))
                 AS x ORDER BY x) AS rids,
           ARRAY(SELECT DISTINCT x FROM unnest(COALESCE(mv.refs, '{}') || COALESCE(rs.refs, '{}'))
                 AS x ORDER BY x) AS refs
    FROM num n
    JOIN locations l ON l.id = n.location_id
    LEFT JOIN mv ON mv.xid = n.xid AND mv.sku = n.sku AND mv.location_id = n.location_id
    LEFT JOIN rs ON rs.xid = n.xid AND rs.sku = n.sku AND rs.location_id = n.location_id
),
-- each SKU's available-to-promise after this pass: the kept total moved by this pass's changes,
-- or (none kept, or a location changed) counted from the stock rows, which this statement sees
-- exactly as those changes left them
moved AS (SELECT sku, sum(d_remote) AS d_remote, sum(d_pos) AS d_pos FROM ev GROUP BY sku),
tot AS (
    SELECT m.sku,
           CASE WHEN a.sku IS NULL OR (SELECT yes FROM reset) THEN c.remote
                ELSE a.remote + m.d_remote END AS remote,
           CASE WHEN a.sku IS NULL OR (SELECT yes FROM reset) THEN c.pos
                ELSE a.pos + m.d_pos END AS pos
    FROM moved m
    LEFT JOIN sku_availability a ON a.sku = m.sku
    LEFT JOIN LATERAL (
        SELECT COALESCE(sum(GREATEST(s.on_hand - s.reserved
                                     - COALESCE(s.safety_stock, l.default_safety_stock), 0))
                        FILTER (WHERE l.active), 0) AS remote,
               COALESCE(sum(GREATEST(s.on_hand - s.reserved, 0)) FILTER (WHERE l.active), 0)
                   AS pos
        FROM stock s JOIN locations l ON l.id = s.location_id
        -- (not counted at all where the kept total is used)
        WHERE s.sku = m.sku AND (a.sku IS NULL OR (SELECT yes FROM reset))) c ON true
),
-- after a change: the SKU's total after the pass, less what the pass's later changes did
fin AS (
    SELECT ev.*, t.remote - COALESCE(sum(ev.d_remote) OVER w, 0) AS remote_after,
           t.pos - COALESCE(sum(ev.d_pos) OVER w, 0) AS pos_after
    FROM ev JOIN tot t USING (sku)
    WINDOW w AS (PARTITION BY ev.sku ORDER BY ev.seq
                 ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
),
ins AS (
    INSERT INTO stock_events (seq, kind, sku, location_id, on_hand, reserved, safety, d_on_hand,
        d_reserved, version, stock_seq, location_active, sku_remote_before, sku_remote_after,
        sku_pos_before, sku_pos_after, reservation_ids, order_refs, committed_at)
    SELECT seq,
        CASE
            WHEN kinds IS NOT NULL THEN CASE
                WHEN 'SALE' = ANY(kinds) THEN
                    CASE WHEN reserved < old_reserved THEN 'COMMIT' ELSE 'SALE' END
                WHEN 'RETURN' = ANY(kinds) THEN 'RETURN'
                WHEN 'COUNT' = ANY(kinds) THEN 'COUNT'
                WHEN 'IMPORT' = ANY(kinds) THEN 'IMPORT'
                WHEN 'TRANSFER_OUT' = ANY(kinds) OR 'TRANSFER_IN' = ANY(kinds) THEN 'TRANSFER'
                WHEN 'RECEIPT' = ANY(kinds) THEN 'RECEIPT'
                ELSE 'ADJUSTMENT' END
            WHEN reserved > old_reserved THEN 'RESERVE'
            WHEN reserved < old_reserved THEN
                CASE WHEN 'EXPIRED' = ANY(statuses) THEN 'EXPIRY' ELSE 'RELEASE' END
            WHEN on_hand <> old_on_hand THEN 'ADJUSTMENT'
            ELSE 'SAFETY_STOCK'
        END,
        sku, location_id, on_hand, reserved, safety, on_hand - old_on_hand,
        reserved - old_reserved, version, stock_seq, active, remote_after - d_remote,
        remote_after, pos_after - d_pos, pos_after, rids, refs, committed_at
    FROM fin
    RETURNING seq
),
keep AS (
    INSERT INTO sku_availability (sku, remote, pos) SELECT sku, remote, pos FROM tot
    ON CONFLICT (sku) DO UPDATE SET remote = EXCLUDED.remote, pos = EXCLUDED.pos
)
SELECT (SELECT count(*) FROM ins) AS n, (SELECT COALESCE(max(seq), $1::bigint) FROM ins) AS last,
       CASE WHEN (SELECT yes FROM reset) THEN ARRAY(SELECT sku FROM tot) END AS recounted
"""

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


async def sequence_pass(conn: asyncpg.Connection) -> int | None:
    """Number the committed changes not numbered yet (the oldest transactions' first, up to
    PASS_ROWS), in one transaction on `conn`: the events made, or None when another pass holds
    the lock. Readers are told by a NOTIFY on
    NOTIFY_CHANNEL (sent at COMMIT, so never before the events can be read). An idle pass is
    one indexed statement, not the big one."""
    if await conn.fetchval("SELECT id FROM stock_changes ORDER BY id LIMIT 1") is None:
        return 0
    async with conn.transaction():
        last = await conn.fetchval(
            "SELECT last_seq FROM watch_state WHERE id = 1 FOR UPDATE SKIP LOCKED")
        if last is None:
            return None
        # a generic plan: this statement runs many times a second and its shape never changes;
        # planning it anew each time (the pool's force_custom_plan) would cost more than it runs
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        row = await conn.fetchrow(_SEQUENCE, last, PASS_ROWS)
        n, new_last = int(row["n"]), int(row["last"])
        if row["recounted"] is not None:
            # totals kept for SKUs this pass did not count may be stale now: counted when next
            # touched
            await conn.execute("DELETE FROM sku_availability WHERE sku <> ALL($1::text[])",
                               row["recounted"])
        if n:
            await conn.execute("UPDATE watch_state SET last_seq = $1 WHERE id = 1", new_last)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(new_last))
    return n


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
