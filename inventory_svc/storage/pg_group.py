"""Statements of the group commits (app/group_commit, app/group_settle) that are theirs alone.

A group's idempotency lookup rides in the statement that locks its rows (`lock_stock_and_answers`,
`lock_reservations`): the keys' advisory locks are taken by the statement before, so the lookup's
snapshot, taken as the locking statement starts, sees any first call that committed before our
locks (see pg_base.claim_keys) — one round trip less per group than a lookup of its own.

Of Commit and Release, a group of reservations is locked in one statement, and everything it
writes but the idempotency answers goes in one more.

A group of plain reservations that fits, with no key in use, is one statement and no explicit
transaction at all (`reserve_at_once`): it locks, checks and writes, and commits as it ends.

Locks are taken in the order every path takes them: reservations (by id), then stock rows (by
sku, location), then capacity rows (by location, day). A group therefore never deadlocks with
another group, with a single call or with the expiry sweeper.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from inventory_svc.domain.model import (
    Channel,
    Line,
    Movement,
    MovementKind,
    Reservation,
    StockLevel,
)
from inventory_svc.domain.model import ReservationStatus as Status
from inventory_svc.domain.rules import LockedStock, StockKey
from inventory_svc.storage.pg import (
    STOCK_COLUMNS,
    MovementDraft,
    NewReservation,
    idempotency_taken,
    key_taken,
    reservation_args,
    reservation_inserts,
    stock_level,
)
from inventory_svc.storage.pg_base import advisory_key, to_ms

_ANSWERS = ("SELECT key, method, request_hash, response FROM idempotency"
            " WHERE key = ANY($K::text[])")


@dataclass(frozen=True, slots=True)
class LockedReservation:
    """A reservation locked for its end, as it was before: the statuses it may end from are
    the caller's to judge (`due`: past its expiry by Postgres' clock)."""

    reservation: Reservation
    owner: str
    due: bool
    capacity_day: date | None
    capacity_locations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ending:
    """A reservation that ends now: its new status and its outbox event."""

    id: str
    status: Status
    event: dict[str, object]


async def lock_stock_and_answers(
    conn: asyncpg.Connection, keys: Iterable[StockKey], answer_keys: Sequence[str]
) -> tuple[dict[StockKey, LockedStock], datetime, dict[str, asyncpg.Record]]:
    """PgStore.lock_stock_timed, and the stored answers of these idempotency keys (by key),
    in one statement."""
    ordered = sorted(set(keys))
    rows = await conn.fetch(
        f"WITH st AS (SELECT {STOCK_COLUMNS}"
        "  FROM unnest($1::text[], $2::text[]) AS k(sku, location_id)"
        "  JOIN stock s ON s.sku = k.sku AND s.location_id = k.location_id"
        "  JOIN locations l ON l.id = s.location_id"
        "  ORDER BY s.sku, s.location_id FOR UPDATE OF s),"
        f" an AS ({_ANSWERS.replace('$K', '$3')})"
        " SELECT false AS answer, st.*, NULL AS key, NULL AS method, NULL::bytea AS request_hash,"
        "  NULL::bytea AS response, now() AS now FROM st"
        " UNION ALL SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, an.key,"
        "  an.method, an.request_hash, an.response, now() FROM an"
        " UNION ALL SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        "  NULL, NULL, now()",  # a row for now() when neither has one
        [k[0] for k in ordered], [k[1] for k in ordered], list(answer_keys),
    )
    locked = {(r["sku"], r["location_id"]): LockedStock(stock_level(r), r["active"])
              for r in rows if not r["answer"]}
    answers = {r["key"]: r for r in rows if r["answer"] and r["key"] is not None}
    return locked, rows[0]["now"], answers


@dataclass(frozen=True, slots=True)
class Want:
    """What a group asks of one stock row: its units, and whether any of them is for a
    channel that must leave the row's safety stock (every channel but POS)."""

    key: StockKey
    units: int
    buffered: bool


async def reserve_at_once(
    conn: asyncpg.Connection, new: Sequence[NewReservation], wants: Sequence[Want],
) -> tuple[list[StockLevel] | None, datetime | None]:
    """Reserve a whole group in one statement, outside a transaction: lock the rows in (sku,
    location) order; if every row exists at an active location and has what the group asks
    (leaving the safety stock if any unit is for a remote channel: stricter than the call by
    call check, never looser), and every key's advisory lock is free, write what
    `PgStore.write_reservations` writes; commit as the statement ends. Returns the rows' new
    levels, or None when nothing was written: some check failed, or a key already has a
    record (a repeat, or a first call that committed meanwhile). And Postgres' `now()`, when
    the statement did not fail."""
    ordered = sorted(wants, key=lambda w: w.key)
    keys = [x.record[0] for x in new if x.record[0] is not None]
    try:
        rows = await conn.fetch(
            "WITH lk AS (SELECT s.sku, s.location_id, w.qty,"
            "  COALESCE(s.safety_stock, l.default_safety_stock) AS safety,"
            "  l.active AND s.on_hand - s.reserved - CASE WHEN w.buffered"
            "   THEN COALESCE(s.safety_stock, l.default_safety_stock) ELSE 0 END >= w.qty AS fits"
            "  FROM unnest($1::text[], $2::text[], $3::bigint[], $20::bool[])"
            "   AS w(sku, loc, qty, buffered)"
            "  JOIN stock s ON s.sku = w.sku AND s.location_id = w.loc"
            "  JOIN locations l ON l.id = s.location_id"
            "  ORDER BY s.sku, s.location_id FOR UPDATE OF s),"
            " go AS (SELECT count(*) = cardinality($1::text[]) AND coalesce(bool_and(fits), false)"
            "  AND (SELECT coalesce(bool_and(pg_try_advisory_xact_lock(k)), true)"
            "   FROM unnest($21::bigint[]) AS k) AS ok FROM lk),"
            " upd AS (UPDATE stock s SET reserved = s.reserved + lk.qty FROM lk"
            "  WHERE s.sku = lk.sku AND s.location_id = lk.location_id AND (SELECT ok FROM go)"
            "  RETURNING s.sku, s.location_id, s.on_hand, s.reserved, lk.safety, s.version,"
            "   s.seq),"
            f" {reservation_inserts('(SELECT ok FROM go)')}"
            " SELECT sku, location_id, on_hand, reserved, safety, version, seq, now() AS now"
            " FROM upd UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, now()",
            [w.key[0] for w in ordered], [w.key[1] for w in ordered],
            [w.units for w in ordered], *reservation_args(new),
            [w.buffered for w in ordered], [advisory_key(k) for k in keys],
        )
    except asyncpg.UniqueViolationError as exc:
        if not key_taken(exc):
            raise
        return None, None  # the statement failed: nothing was written
    levels = [stock_level(r) for r in rows if r["sku"] is not None]
    return (levels if len(levels) == len(ordered) else None), rows[0]["now"]


async def lock_reservations(
    conn: asyncpg.Connection, ids: Sequence[str], answer_keys: Sequence[str] = (),
) -> tuple[dict[str, LockedReservation], datetime, dict[str, asyncpg.Record]]:
    """Lock the reservations with these ids in id order, with their lines, and read the stored
    answers of these idempotency keys (by key), in one statement; the ids not found are absent.
    Also the transaction's `now()`: the ended_at of what ends."""
    rows = await conn.fetch(
        "WITH rs AS (SELECT r.id, r.status, r.channel, r.order_ref, r.created_at,"
        "  r.expires_at, r.ended_at, r.owner, r.capacity_day, r.capacity_locations,"
        "  r.expires_at <= now() AS due, l.sku, l.location_id, l.quantity"
        "  FROM reservations r LEFT JOIN reservation_lines l ON l.reservation_id = r.id"
        "  WHERE r.id = ANY($1::text[])"
        "  ORDER BY r.id, l.sku, l.location_id FOR UPDATE OF r),"
        f" an AS ({_ANSWERS.replace('$K', '$2')})"
        " SELECT false AS answer, rs.*, NULL AS key, NULL AS method,"
        "  NULL::bytea AS request_hash, NULL::bytea AS response, now() AS now FROM rs"
        " UNION ALL SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        "  NULL, NULL, NULL, NULL, an.key, an.method, an.request_hash, an.response, now()"
        " FROM an"
        " UNION ALL SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        "  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, now()",
        sorted(set(ids)), list(answer_keys),
    )
    now: datetime = rows[0]["now"]
    answers = {r["key"]: r for r in rows if r["answer"] and r["key"] is not None}
    rows = [r for r in rows if not r["answer"]]
    found: dict[str, LockedReservation] = {}
    lines: dict[str, list[Line]] = {}
    for r in rows:
        lines.setdefault(r["id"], [])
        if r["sku"] is not None:
            lines[r["id"]].append(Line(r["sku"], r["location_id"], r["quantity"]))
    for r in rows:
        if r["id"] in found:
            continue
        res = Reservation(
            id=r["id"], status=Status(r["status"]), channel=Channel(r["channel"]),
            order_ref=r["order_ref"], lines=tuple(lines[r["id"]]),
            created_at_ms=to_ms(r["created_at"]), expires_at_ms=to_ms(r["expires_at"]),
            ended_at_ms=to_ms(r["ended_at"]))
        found[r["id"]] = LockedReservation(res, r["owner"], r["due"], r["capacity_day"],
                                           tuple(r["capacity_locations"] or ()))
    return found, now, answers


async def write_settlements(
    conn: asyncpg.Connection, levels: Sequence[tuple[StockKey, int, int]],
    sales: Sequence[tuple[MovementDraft, int]], endings: Sequence[Ending],
) -> tuple[dict[StockKey, tuple[int, int]], list[Movement]]:
    """One statement: the locked stock rows' new (on_hand, reserved), the SALE ledger rows
    (with their on_hand after), the reservations' ends (a released one gives up its shipments'
    record; the caller gave the shipments back) and their outbox events. Returns each stock
    row's (version, seq) and the ledger rows written."""
    rows = await conn.fetch(
        "WITH st AS (UPDATE stock s SET on_hand = c.on_hand, reserved = c.reserved,"
        "  version = s.version + CASE WHEN s.on_hand <> c.on_hand THEN 1 ELSE 0 END"
        "  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])"
        "   AS c(sku, location_id, on_hand, reserved)"
        "  WHERE s.sku = c.sku AND s.location_id = c.location_id"
        "  RETURNING s.sku, s.location_id, s.version, s.seq),"
        " mv AS (INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after,"
        "  reservation_id, order_ref) SELECT * FROM unnest($5::text[], $6::text[],"
        "  $7::bigint[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[])"
        "  RETURNING *),"
        " en AS (UPDATE reservations r SET status = e.status, ended_at = now(),"
        "  capacity_locations = CASE WHEN e.status = 'RELEASED' THEN '{}'::text[]"
        "   ELSE r.capacity_locations END"
        "  FROM unnest($13::text[], $14::text[]) AS e(id, status) WHERE r.id = e.id),"
        " ob AS (INSERT INTO outbox (kind, payload)"
        "  SELECT 'RESERVATION', e.payload FROM unnest($15::jsonb[])"
        "   WITH ORDINALITY AS e(payload, i) ORDER BY e.i)"
        " SELECT false AS ledger, sku, location_id, version, seq, NULL::bigint AS id,"
        "  NULL::bigint AS delta, NULL::text AS kind, NULL::text AS reason,"
        "  NULL::bigint AS on_hand_after, NULL::text AS reservation_id, NULL::text AS order_ref,"
        "  NULL::timestamptz AS created_at FROM st"
        " UNION ALL SELECT true, sku, location_id, NULL, NULL, id, delta, kind, reason,"
        "  on_hand_after, reservation_id, order_ref, created_at FROM mv",
        [k[0] for k, _, _ in levels], [k[1] for k, _, _ in levels],
        [on_hand for _, on_hand, _ in levels], [reserved for _, _, reserved in levels],
        [d.sku for d, _ in sales], [d.location_id for d, _ in sales],
        [d.delta for d, _ in sales], [d.kind.value for d, _ in sales],
        [d.reason for d, _ in sales], [after for _, after in sales],
        [d.reservation_id for d, _ in sales], [d.order_ref for d, _ in sales],
        [e.id for e in endings], [e.status.value for e in endings],
        [json.dumps(e.event) for e in endings],
    )
    versions: dict[StockKey, tuple[int, int]] = {}
    moves: list[Movement] = []
    for r in rows:
        if not r["ledger"]:
            versions[(r["sku"], r["location_id"])] = (r["version"], r["seq"])
            continue
        moves.append(Movement(
            id=r["id"], sku=r["sku"], location_id=r["location_id"], delta=r["delta"],
            kind=MovementKind(r["kind"]), reason=r["reason"],
            on_hand_after=r["on_hand_after"], reservation_id=r["reservation_id"],
            order_ref=r["order_ref"], created_at_ms=to_ms(r["created_at"])))
    moves.sort(key=lambda m: m.id)
    return versions, moves


async def store_answers(
    conn: asyncpg.Connection, records: Sequence[tuple[str, str, bytes, bytes]]
) -> None:
    """The idempotency rows (key, method, request hash, answer) of the group's keyed calls."""
    if not records:
        return
    with idempotency_taken():
        await conn.execute(
            "INSERT INTO idempotency (key, method, request_hash, response)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[])",
            [r[0] for r in records], [r[1] for r in records], [r[2] for r in records],
            [r[3] for r in records])
