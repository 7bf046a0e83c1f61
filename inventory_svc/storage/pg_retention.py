"""Statements of retention (app/retention.py): each deletes one small batch of old rows and says
how many it deleted. Times are Postgres' (the rows were stamped by its clock); windows are
seconds. None waits for a row lock: rows someone holds are skipped and found by a later run."""

from __future__ import annotations

import asyncpg

BIG = 2**63 - 1


async def purge_idempotency(conn: asyncpg.Connection, window_s: float, batch: int) -> int:
    """Idempotency records older than the window (found through the BRIN index on created_at:
    `summarize` first, so the newest pages are in it)."""
    n: int = await conn.fetchval(
        "WITH doomed AS (SELECT key FROM idempotency"
        "  WHERE created_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED),"
        " gone AS (DELETE FROM idempotency i USING doomed d WHERE i.key = d.key RETURNING 1)"
        " SELECT count(*) FROM gone", window_s, batch)
    return n


async def summarize_idempotency(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT brin_summarize_new_values('idempotency_created')")


async def purge_outbox(conn: asyncpg.Connection, window_s: float, batch: int) -> int:
    """Outbox rows older than the window among the oldest `batch`, and never one the sequencer
    may still look up (a transaction whose stock changes are not numbered yet)."""
    n: int = await conn.fetchval(
        "WITH old AS (SELECT id, created_at FROM outbox ORDER BY id LIMIT $2),"
        " gone AS (DELETE FROM outbox o USING old WHERE o.id = old.id"
        "  AND old.created_at < LEAST(now() - make_interval(secs => $1),"
        "                             (SELECT min(changed_at) FROM stock_changes))"
        "  RETURNING 1)"
        " SELECT count(*) FROM gone", window_s, batch)
    return n


async def purge_events(conn: asyncpg.Connection, window_s: float, batch: int,
                       cursor_stale_s: float) -> int:
    """The oldest events, up to (not including) the first that is younger than the window or
    that a live stream has not passed yet: always from the oldest end, so the stream's numbers
    stay contiguous after the first one kept (a gap tells a reader "deleted", never "still to
    come"). A cursor not refreshed for cursor_stale_s is no longer live."""
    n: int = await conn.fetchval(
        "WITH live AS (SELECT min(seq) AS m FROM watch_cursors"
        "  WHERE updated_at > now() - make_interval(secs => $3)),"
        " old AS (SELECT seq, committed_at FROM stock_events ORDER BY seq LIMIT $2),"
        " stop AS (SELECT COALESCE(min(seq), $4) AS s FROM old"
        "  WHERE committed_at >= now() - make_interval(secs => $1)"
        "   OR seq > COALESCE((SELECT m FROM live), $4)),"
        " gone AS (DELETE FROM stock_events e USING old"
        "  WHERE e.seq = old.seq AND old.seq < (SELECT s FROM stop) RETURNING 1)"
        " SELECT count(*) FROM gone", window_s, batch, cursor_stale_s, BIG)
    return n


async def purge_reservations(conn: asyncpg.Connection, window_s: float, batch: int,
                             after_id: str) -> tuple[int, str | None]:
    """Ended reservations (and their lines) that ended longer than the window ago, among the
    next `batch` by id after `after_id`. Reservation ids begin with their creation time
    (`r` + milliseconds in 11 hex digits: app/reservations.py), so the scan stops at the ids of
    reservations made within the window. Returns (deleted, the last id looked at; None: no more
    to look at)."""
    row = await conn.fetchrow(
        "WITH bound AS (SELECT 'r' || lpad(to_hex((extract(epoch FROM now()"
        "  - make_interval(secs => $1)) * 1000)::bigint), 11, '0') AS id),"
        " scan AS (SELECT id FROM reservations WHERE id > $3 AND id < (SELECT id FROM bound)"
        "  ORDER BY id LIMIT $2),"
        " doomed AS (SELECT r.id FROM reservations r JOIN scan USING (id)"
        "  WHERE r.status <> 'ACTIVE' AND r.ended_at < now() - make_interval(secs => $1)"
        "  FOR UPDATE OF r SKIP LOCKED),"
        " lines AS (DELETE FROM reservation_lines l USING doomed d WHERE l.reservation_id = d.id),"
        " gone AS (DELETE FROM reservations r USING doomed d WHERE r.id = d.id RETURNING 1)"
        " SELECT (SELECT count(*) FROM gone) AS n, (SELECT max(id) FROM scan) AS last",
        window_s, batch, after_id)
    return int(row["n"]), row["last"]


async def purge_capacity(conn: asyncpg.Connection, window_days: int, batch: int) -> int:
    """capacity_usage rows of days more than `window_days` before today (never today's or a
    later day's, whatever the window), but never one an ACTIVE reservation took a shipment on:
    its release or expiry gives the shipment back on that row (migration 0004). No reservation
    can take one on a past day, so a row none holds now stays free of them. The ACTIVE
    reservations are looked at only when there is an old row at all (about once a day), through
    their partial index (status = 'ACTIVE')."""
    n: int = await conn.fetchval(
        "WITH cut AS (SELECT current_date - GREATEST($1::int, 0) AS day),"
        " held AS MATERIALIZED (SELECT r.capacity_day AS day, loc"
        "  FROM reservations r, unnest(r.capacity_locations) AS loc"
        "  WHERE r.status = 'ACTIVE' AND r.capacity_day < (SELECT day FROM cut)"
        "   AND EXISTS (SELECT 1 FROM capacity_usage WHERE day < (SELECT day FROM cut))),"
        " doomed AS (SELECT c.location_id, c.day FROM capacity_usage c"
        "  WHERE c.day < (SELECT day FROM cut) AND NOT EXISTS (SELECT 1 FROM held h"
        "   WHERE h.day = c.day AND h.loc = c.location_id)"
        "  ORDER BY c.day, c.location_id LIMIT $2 FOR UPDATE OF c SKIP LOCKED),"
        " gone AS (DELETE FROM capacity_usage c USING doomed d"
        "  WHERE c.location_id = d.location_id AND c.day = d.day RETURNING 1)"
        " SELECT count(*) FROM gone", window_days, batch)
    return n


async def purge_cursors(conn: asyncpg.Connection, stale_s: float) -> int:
    """Cursor rows of processes that stopped refreshing them (killed)."""
    n: int = await conn.fetchval(
        "WITH gone AS (DELETE FROM watch_cursors"
        "  WHERE updated_at < now() - make_interval(secs => $1) RETURNING 1)"
        " SELECT count(*) FROM gone", stale_s)
    return n
