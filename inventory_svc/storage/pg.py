"""Postgres store: the source of truth. Every stock change locks its rows in (sku, location) order,
applies a pure domain check, and writes stock, ledger and outbox in one transaction."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

import asyncpg

from inventory_svc.domain.errors import Aborted, FailedPrecondition, NotFound
from inventory_svc.domain.model import (
    Channel,
    Line,
    Location,
    LocationType,
    Movement,
    MovementKind,
    Reservation,
    ReservationStatus,
    StockLevel,
)
from inventory_svc.domain.rules import LockedStock, StockKey
from inventory_svc.storage.pg_base import PgBase, to_ms, translate_errors

LOCATION_COLUMNS = (
    "id, name, type, lat, lon, can_ship, can_pickup, active, priority, fixed_cost, cost_per_km,"
    " cost_per_unit, daily_capacity, default_safety_stock"
)
STOCK_COLUMNS = (
    "s.sku, s.location_id, s.on_hand, s.reserved,"
    " COALESCE(s.safety_stock, l.default_safety_stock) AS safety, s.version, s.seq, l.active"
)
STOCK_SELECT = f"SELECT {STOCK_COLUMNS} FROM stock s JOIN locations l ON l.id = s.location_id"


@dataclass(frozen=True, slots=True)
class NewReservation:
    """An ACTIVE reservation to write: its outbox event and, with a key, its idempotency row
    (key, method, request hash, answer; key None without one), its owner (the principal's name)
    and the locations whose shipment of the day it took (routing)."""

    reservation: Reservation
    event: dict[str, object]
    record: tuple[str | None, str, bytes, bytes]
    owner: str = ""
    capacity_locations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActiveReservation:
    """A locked ACTIVE reservation with what its owner's quotas and its capacity need."""

    reservation: Reservation
    owner: str
    extensions: int
    capacity_day: date | None  # the day of the capacity_usage rows its slots are on
    capacity_locations: tuple[str, ...]  # locations whose shipment of that day it holds


@dataclass(frozen=True, slots=True)
class MovementDraft:
    sku: str
    location_id: str
    delta: int
    kind: MovementKind
    reason: str = ""
    reservation_id: str = ""
    order_ref: str = ""


def _location(row: asyncpg.Record) -> Location:
    return Location(
        id=row["id"], name=row["name"], type=LocationType(row["type"]), lat=row["lat"],
        lon=row["lon"], can_ship=row["can_ship"], can_pickup=row["can_pickup"],
        active=row["active"], priority=row["priority"], fixed_cost=row["fixed_cost"],
        cost_per_km=row["cost_per_km"], cost_per_unit=row["cost_per_unit"],
        daily_capacity=row["daily_capacity"], default_safety_stock=row["default_safety_stock"],
    )


def stock_level(row: asyncpg.Record) -> StockLevel:
    return StockLevel(
        row["sku"], row["location_id"], row["on_hand"], row["reserved"], row["safety"],
        row["version"], row["seq"],
    )


def levels_by_sku(rows: Iterable[asyncpg.Record]) -> dict[str, list[StockLevel]]:
    """Stock rows (as STOCK_SELECT reads them) grouped by SKU."""
    out: dict[str, list[StockLevel]] = {}
    for r in rows:
        out.setdefault(r["sku"], []).append(stock_level(r))
    return out


def _movement(row: asyncpg.Record) -> Movement:
    return Movement(
        id=row["id"], sku=row["sku"], location_id=row["location_id"], delta=row["delta"],
        kind=MovementKind(row["kind"]), reason=row["reason"], on_hand_after=row["on_hand_after"],
        reservation_id=row["reservation_id"], order_ref=row["order_ref"],
        created_at_ms=to_ms(row["created_at"]),
    )


class PgStore(PgBase):
    """Reads and the row-level writes the application composes into units of work."""

    # ---- locations -------------------------------------------------------------------------
    async def list_locations(
        self, ids: Sequence[str] = (), type_: LocationType | None = None,
        include_inactive: bool = True,
    ) -> list[Location]:
        sql = f"SELECT {LOCATION_COLUMNS} FROM locations WHERE true"
        args: list[object] = []
        if ids:
            args.append(list(ids))
            sql += f" AND id = ANY(${len(args)}::text[])"
        if type_ is not None:
            args.append(type_.value)
            sql += f" AND type = ${len(args)}"
        if not include_inactive:
            sql += " AND active"
        with translate_errors():
            rows = await self.pool.fetch(sql + " ORDER BY id", *args)
        return [_location(r) for r in rows]

    @staticmethod
    async def upsert_locations(conn: asyncpg.Connection, locations: Sequence[Location]) -> None:
        await conn.executemany(
            f"INSERT INTO locations ({LOCATION_COLUMNS}) VALUES"
            " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, type = EXCLUDED.type,"
            " lat = EXCLUDED.lat, lon = EXCLUDED.lon, can_ship = EXCLUDED.can_ship,"
            " can_pickup = EXCLUDED.can_pickup, active = EXCLUDED.active,"
            " priority = EXCLUDED.priority, fixed_cost = EXCLUDED.fixed_cost,"
            " cost_per_km = EXCLUDED.cost_per_km, cost_per_unit = EXCLUDED.cost_per_unit,"
            " daily_capacity = EXCLUDED.daily_capacity,"
            " default_safety_stock = EXCLUDED.default_safety_stock, updated_at = now()",
            [
                (x.id, x.name, x.type.value, x.lat, x.lon, x.can_ship, x.can_pickup, x.active,
                 x.priority, x.fixed_cost, x.cost_per_km, x.cost_per_unit, x.daily_capacity,
                 x.default_safety_stock)
                for x in locations
            ],
        )
        await PgStore.add_outbox(
            conn, "LOCATIONS_CHANGED", [("", "", {"ids": [x.id for x in locations]})])

    @staticmethod
    async def skus_at_locations(conn: asyncpg.Connection, location_ids: Sequence[str]) -> list[str]:
        rows = await conn.fetch(
            "SELECT DISTINCT sku FROM stock WHERE location_id = ANY($1::text[])", list(location_ids)
        )
        return [r["sku"] for r in rows]

    # ---- stock reads -----------------------------------------------------------------------
    async def stock_of_skus(self, skus: Sequence[str]) -> dict[str, list[StockLevel]]:
        """Every stock row of these SKUs, as Redis hydration needs them."""
        with translate_errors():
            rows = await self.pool.fetch(
                STOCK_SELECT + " WHERE s.sku = ANY($1::text[])", list(skus)
            )
        return {sku: [] for sku in skus} | levels_by_sku(rows)

    async def stock_page(self, after_sku: str, limit: int) -> dict[str, list[StockLevel]]:
        """All rows of the next `limit` SKUs after `after_sku`, for rebuilds and reconciliation."""
        with translate_errors():
            rows = await self.pool.fetch(
                STOCK_SELECT
                + " WHERE s.sku IN (SELECT DISTINCT sku FROM stock WHERE sku > $1"
                " ORDER BY sku LIMIT $2) ORDER BY s.sku",
                after_sku, limit,
            )
        return levels_by_sku(rows)

    async def stock_seq_now(self) -> int:
        """The last seq handed out (taken before a transaction that got it may have committed)."""
        with translate_errors():
            return int(await self.pool.fetchval("SELECT last_value FROM stock_seq"))

    async def changed_since(self, seq: int) -> dict[str, set[str]]:
        """The SKU-locations changed (seq above `seq`), by SKU. A scan of the stock table without
        an index: an index on seq would cost every stock update its HOT path."""
        with translate_errors():
            rows = await self.pool.fetch(
                "SELECT sku, location_id FROM stock WHERE seq > $1", seq)
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["sku"], set()).add(r["location_id"])
        return out

    # ---- stock writes (inside a unit) --------------------------------------------------------
    @staticmethod
    async def lock_stock(
        conn: asyncpg.Connection, keys: Iterable[StockKey], *, create: bool = False,
        timeout: float | None = None,
    ) -> dict[StockKey, LockedStock]:
        rows, _ = await PgStore.lock_stock_timed(conn, keys, create=create, timeout=timeout)
        return rows

    @staticmethod
    async def lock_stock_timed(
        conn: asyncpg.Connection, keys: Iterable[StockKey], *, create: bool = False,
        timeout: float | None = None,
    ) -> tuple[dict[StockKey, LockedStock], datetime]:
        """Lock the rows in (sku, location) order, so concurrent multi-row changes never deadlock.

        With `create`, rows that do not exist yet are made (on_hand 0, version 0) first, provided
        their location exists; the caller reports a missing location as NOT_FOUND.
        """
        ordered = sorted(set(keys))
        skus = [k[0] for k in ordered]
        locs = [k[1] for k in ordered]
        if create:
            await conn.execute(
                "INSERT INTO stock (sku, location_id, on_hand, version)"
                " SELECT k.sku, k.location_id, 0, 0"
                " FROM unnest($1::text[], $2::text[]) AS k(sku, location_id)"
                " JOIN locations l ON l.id = k.location_id ORDER BY 1, 2"
                " ON CONFLICT DO NOTHING",
                skus, locs, timeout=timeout,
            )
        # The key list drives an index nested loop into stock. (An `IN (SELECT unnest ...)`
        # form got a cached generic plan from small calls that went quadratic on bulk loads.)
        rows = await conn.fetch(
            f"SELECT {STOCK_COLUMNS}, now() AS now"
            " FROM unnest($1::text[], $2::text[]) AS k(sku, location_id)"
            " JOIN stock s ON s.sku = k.sku AND s.location_id = k.location_id"
            " JOIN locations l ON l.id = s.location_id"
            " ORDER BY s.sku, s.location_id FOR UPDATE OF s",
            skus, locs, timeout=timeout,
        )
        # now(): the transaction's start, so a caller can stamp rows without asking again
        now = rows[0]["now"] if rows else await conn.fetchval("SELECT now()")
        return {(r["sku"], r["location_id"]): LockedStock(stock_level(r), r["active"]) for r in rows}, now

    @staticmethod
    async def write_levels(
        conn: asyncpg.Connection, levels: Sequence[StockLevel], *, timeout: float | None = None
    ) -> list[StockLevel]:
        """Store new on_hand/reserved of locked rows; returns them with their versions and seqs.

        The version moves only when on_hand does: it guards counts (SetStock's compare-and-set),
        which reservations coming and going must not invalidate.
        """
        rows = await conn.fetch(
            "UPDATE stock s SET on_hand = c.on_hand, reserved = c.reserved,"
            " version = s.version + CASE WHEN s.on_hand <> c.on_hand THEN 1 ELSE 0 END"
            " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])"
            " AS c(sku, location_id, on_hand, reserved)"
            " WHERE s.sku = c.sku AND s.location_id = c.location_id"
            " RETURNING s.sku, s.location_id, s.version, s.seq",
            [x.sku for x in levels], [x.location_id for x in levels],
            [x.on_hand for x in levels], [x.reserved for x in levels], timeout=timeout,
        )
        got = {(r["sku"], r["location_id"]): r for r in rows}
        return [replace(x, version=got[(x.sku, x.location_id)]["version"],
                        seq=got[(x.sku, x.location_id)]["seq"]) for x in levels]

    @staticmethod
    async def write_safety(
        conn: asyncpg.Connection, sku: str, location_id: str, safety: int | None
    ) -> StockLevel:
        row = await conn.fetchrow(
            "WITH u AS (UPDATE stock SET safety_stock = $3, version = version + 1"
            " WHERE sku = $1 AND location_id = $2 RETURNING *)"
            " SELECT u.sku, u.location_id, u.on_hand, u.reserved, u.version, u.seq,"
            " COALESCE(u.safety_stock, l.default_safety_stock) AS safety"
            " FROM u JOIN locations l ON l.id = u.location_id",
            sku, location_id, safety,
        )
        return stock_level(row)

    @staticmethod
    async def add_movements(
        conn: asyncpg.Connection, drafts: Sequence[MovementDraft], on_hand_after: Sequence[int],
        *, timeout: float | None = None, returning: bool = True,
    ) -> list[Movement]:
        """Ledger rows; `returning=False` for bulk loads that do not answer with them."""
        if not drafts:
            return []
        rows = await (conn.fetch if returning else conn.execute)(
            "INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after,"
            " reservation_id, order_ref) SELECT * FROM unnest($1::text[], $2::text[],"
            " $3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[])"
            + (" RETURNING *" if returning else ""),
            [d.sku for d in drafts], [d.location_id for d in drafts], [d.delta for d in drafts],
            [d.kind.value for d in drafts], [d.reason for d in drafts], list(on_hand_after),
            [d.reservation_id for d in drafts], [d.order_ref for d in drafts], timeout=timeout,
        )
        return [_movement(r) for r in rows] if returning else []

    @staticmethod
    async def add_outbox(
        conn: asyncpg.Connection, kind: str, events: Sequence[tuple[str, str, dict[str, object]]]
    ) -> None:
        if not events:
            return
        await conn.execute(
            "INSERT INTO outbox (kind, sku, location_id, payload)"
            " SELECT $1, e.sku, e.loc, e.payload::jsonb"
            " FROM unnest($2::text[], $3::text[], $4::text[]) AS e(sku, loc, payload)",
            kind, [e[0] for e in events], [e[1] for e in events],
            [json.dumps(e[2]) for e in events],
        )

    # ---- reservations ----------------------------------------------------------------------
    @staticmethod
    async def write_reservations(
        conn: asyncpg.Connection, new: Sequence[NewReservation], levels: Sequence[StockLevel],
    ) -> list[StockLevel]:
        """The whole write of reservations in one statement (one round trip): reserved units,
        the reservations and their lines, their outbox events and, with keys, their idempotency
        records. `levels` are the locked rows with their new `reserved`; returned with their new
        seqs."""
        with idempotency_taken():
            rows = await conn.fetch(
                "WITH upd AS (UPDATE stock s SET reserved = c.reserved"
                "  FROM unnest($1::text[], $2::text[], $3::bigint[]) AS c(sku, loc, reserved)"
                "  WHERE s.sku = c.sku AND s.location_id = c.loc"
                "  RETURNING s.sku, s.location_id, s.seq),"
                f" {reservation_inserts('true')}"
                " SELECT sku, location_id, seq FROM upd",
                [x.sku for x in levels], [x.location_id for x in levels],
                [x.reserved for x in levels], *reservation_args(new),
            )
        seq = {(r["sku"], r["location_id"]): r["seq"] for r in rows}
        return [replace(x, seq=seq[(x.sku, x.location_id)]) for x in levels]

    @staticmethod
    async def insert_reservation(
        conn: asyncpg.Connection, res_id: str, status: ReservationStatus, channel: Channel,
        order_ref: str, lines: Sequence[Line], ttl_s: int, *, owner: str = "",
    ) -> Reservation:
        ended = "now()" if status is not ReservationStatus.ACTIVE else "NULL"
        row = await conn.fetchrow(
            "INSERT INTO reservations (id, status, channel, order_ref, expires_at, ended_at,"
            " owner)"
            f" VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), {ended}, $6)"
            " RETURNING created_at, expires_at, ended_at",
            res_id, status.value, channel.value, order_ref, float(ttl_s), owner,
        )
        await conn.execute(
            "INSERT INTO reservation_lines (reservation_id, sku, location_id, quantity, requested)"
            " SELECT $1, l.sku, l.loc, l.qty, l.qty"
            " FROM unnest($2::text[], $3::text[], $4::bigint[]) AS l(sku, loc, qty)",
            res_id, [x.sku for x in lines], [x.location_id for x in lines],
            [x.quantity for x in lines],
        )
        return Reservation(
            res_id, status, channel, order_ref, tuple(sorted(lines, key=_line_key)),
            to_ms(row["created_at"]), to_ms(row["expires_at"]), to_ms(row["ended_at"]),
        )

    async def get_reservation(self, res_id: str, *, owner: str | None = None) -> Reservation:
        with translate_errors():
            async with self.pool.acquire() as conn:
                return await self.read_reservation(conn, res_id, lock=False, owner=owner)

    @staticmethod
    async def read_reservation(conn: asyncpg.Connection, res_id: str, *, lock: bool,
                               owner: str | None = None) -> Reservation:
        """A reservation by id; with `owner`, only if that principal owns it: another owner's
        is NOT_FOUND exactly like an unknown id (the answer tells nothing of its existence)."""
        row = await conn.fetchrow(
            "SELECT id, status, channel, order_ref, created_at, expires_at, ended_at"
            " FROM reservations WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"
            + (" FOR UPDATE" if lock else ""),
            res_id, owner,
        )
        if row is None:
            raise NotFound("reservation", res_id)
        return await PgStore._with_lines(conn, row)

    @staticmethod
    async def lock_active(conn: asyncpg.Connection, res_id: str, *,
                          owner: str | None = None) -> Reservation:
        """Lock an ACTIVE, unexpired reservation (its expiry judged by Postgres' clock); with
        `owner`, one of that principal's only (another's is NOT_FOUND, as in read_reservation)."""
        return (await PgStore.lock_active_held(conn, res_id, owner=owner)).reservation

    @staticmethod
    async def lock_active_held(conn: asyncpg.Connection, res_id: str, *,
                               owner: str | None = None) -> ActiveReservation:
        """`lock_active`, with the reservation's owner, extensions and capacity slots (the
        same locked read: one statement for the row, one for its lines)."""
        row = await conn.fetchrow(
            "SELECT id, status, channel, order_ref, created_at, expires_at, ended_at, owner,"
            " extensions, capacity_day, capacity_locations, expires_at <= now() AS due"
            " FROM reservations WHERE id = $1 AND ($2::text IS NULL OR owner = $2) FOR UPDATE",
            res_id, owner,
        )
        if row is None:
            raise NotFound("reservation", res_id)
        if row["status"] != ReservationStatus.ACTIVE.value:
            raise FailedPrecondition(
                f"reservation {res_id!r} is {row['status']}, not ACTIVE",
                violation_type="RESERVATION_NOT_ACTIVE", subject=res_id,
            )
        if row["due"]:
            raise FailedPrecondition(
                f"reservation {res_id!r} has expired", violation_type="RESERVATION_EXPIRED",
                subject=res_id,
            )
        return ActiveReservation(await PgStore._with_lines(conn, row), row["owner"],
                                 row["extensions"], row["capacity_day"],
                                 tuple(row["capacity_locations"]))

    @staticmethod
    async def _with_lines(conn: asyncpg.Connection, row: asyncpg.Record) -> Reservation:
        res_id = row["id"]
        lines = await conn.fetch(
            "SELECT sku, location_id, quantity FROM reservation_lines WHERE reservation_id = $1"
            " ORDER BY sku, location_id",
            res_id,
        )
        return _reservation(row, lines)

    @staticmethod
    async def set_lines_held(
        conn: asyncpg.Connection, res_id: str, held: dict[StockKey, int]
    ) -> None:
        keys = sorted(held)
        await conn.execute(
            "UPDATE reservation_lines r SET quantity = c.qty"
            " FROM unnest($2::text[], $3::text[], $4::bigint[]) AS c(sku, loc, qty)"
            " WHERE r.reservation_id = $1 AND r.sku = c.sku AND r.location_id = c.loc",
            res_id, [k[0] for k in keys], [k[1] for k in keys], [held[k] for k in keys],
        )

    @staticmethod
    async def end_reservation(
        conn: asyncpg.Connection, res_id: str, status: ReservationStatus
    ) -> None:
        await conn.execute(
            "UPDATE reservations SET status = $2, ended_at = now() WHERE id = $1",
            res_id, status.value,
        )

    @staticmethod
    async def extend(conn: asyncpg.Connection, res_id: str, ttl_s: int) -> int:
        """Move the expiry to now + ttl_s; returns how often the reservation was extended."""
        n: int = await conn.fetchval(
            "UPDATE reservations SET expires_at = now() + make_interval(secs => $2),"
            " extensions = extensions + 1 WHERE id = $1 RETURNING extensions",
            res_id, float(ttl_s),
        )
        return n

    async def active_held(self, owner: str) -> tuple[int, int]:
        """An owner's ACTIVE, unexpired reservations and the units they hold, in one statement
        over the reservations_owner_active index (and each one's lines by primary key)."""
        with translate_errors():
            row = await self.pool.fetchrow(
                "SELECT count(*) AS n, COALESCE(sum((SELECT sum(l.quantity)"
                " FROM reservation_lines l WHERE l.reservation_id = r.id)), 0)::bigint AS units"
                " FROM reservations r"
                " WHERE r.owner = $1 AND r.status = 'ACTIVE' AND r.expires_at > now()", owner)
        return int(row["n"]), int(row["units"])

    @staticmethod
    async def lock_due(conn: asyncpg.Connection, limit: int) -> list[str]:
        """Reservations past expiry, locked; those another sweeper holds are skipped."""
        rows = await conn.fetch(
            "SELECT id FROM reservations WHERE status = 'ACTIVE' AND expires_at <= now()"
            " ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
        )
        return [r["id"] for r in rows]

    # ---- ledger ----------------------------------------------------------------------------
    async def list_movements(
        self, *, sku: str, location_id: str, order_ref: str, reservation_id: str,
        after_id: int, limit: int,
    ) -> list[Movement]:
        if order_ref:
            where, args = "order_ref = $1", [order_ref]
        elif reservation_id:
            where, args = "reservation_id = $1", [reservation_id]
        else:
            where, args = "sku = $1 AND location_id = $2", [sku, location_id]
        n = len(args)
        with translate_errors():
            rows = await self.pool.fetch(
                f"SELECT * FROM movements WHERE {where} AND id > ${n + 1} ORDER BY id"
                f" LIMIT ${n + 2}",
                *args, after_id, limit,
            )
        return [_movement(r) for r in rows]


def reservation_inserts(guard: str) -> str:
    """The CTEs that insert new reservations, their lines, outbox events and idempotency
    records from parameters $4-$19 (`reservation_args`), each only where `guard` (SQL) holds."""
    return (
        # capacity: the locations as one comma-joined text each (location ids hold no comma),
        # taken today in this transaction (lock_capacity's current_date)
        "res AS (INSERT INTO reservations (id, status, channel, order_ref, created_at,"
        "  expires_at, owner, capacity_day, capacity_locations)"
        "  SELECT r.id, 'ACTIVE', r.channel, r.order_ref, r.created_at, r.expires_at,"
        "   r.owner, CASE WHEN r.caps <> '' THEN current_date END,"
        "   string_to_array(r.caps, ',')"
        "  FROM unnest($4::text[], $5::text[], $6::text[], $7::timestamptz[],"
        "   $8::timestamptz[], $18::text[], $19::text[])"
        f"   AS r(id, channel, order_ref, created_at, expires_at, owner, caps) WHERE {guard}),"
        " lines AS (INSERT INTO reservation_lines"
        "  (reservation_id, sku, location_id, quantity, requested)"
        "  SELECT l.id, l.sku, l.loc, l.qty, l.qty"
        "  FROM unnest($9::text[], $10::text[], $11::text[], $12::bigint[])"
        f"   AS l(id, sku, loc, qty) WHERE {guard}),"
        " ob AS (INSERT INTO outbox (kind, payload)"
        "  SELECT 'RESERVATION', e.payload FROM unnest($13::jsonb[])"
        f"   WITH ORDINALITY AS e(payload, i) WHERE {guard} ORDER BY e.i),"
        " idem AS (INSERT INTO idempotency (key, method, request_hash, response)"
        "  SELECT * FROM unnest($14::text[], $15::text[], $16::bytea[], $17::bytea[])"
        f"   AS i(key, method, request_hash, response) WHERE {guard})"
    )


def reservation_args(new: Sequence[NewReservation]) -> list[list[object]]:
    """Parameters $4-$19 of `reservation_inserts`."""
    lines = [(x.reservation.id, ln) for x in new for ln in x.reservation.lines]
    keyed = [x.record for x in new if x.record[0] is not None]
    return [
        [x.reservation.id for x in new], [x.reservation.channel.value for x in new],
        [x.reservation.order_ref for x in new],
        [_from_ms(x.reservation.created_at_ms) for x in new],
        [_from_ms(x.reservation.expires_at_ms) for x in new],
        [i for i, _ in lines], [ln.sku for _, ln in lines],
        [ln.location_id for _, ln in lines], [ln.quantity for _, ln in lines],
        [json.dumps(x.event) for x in new],
        [k[0] for k in keyed], [k[1] for k in keyed], [k[2] for k in keyed],
        [k[3] for k in keyed],
        [x.owner for x in new], [",".join(x.capacity_locations) for x in new],
    ]


def key_taken(exc: asyncpg.UniqueViolationError) -> bool:
    """Whether Postgres refused an idempotency record (its key has one already), rather than
    another unique row."""
    return "idempotency" in str(exc.constraint_name or "")


@contextlib.contextmanager
def idempotency_taken() -> Iterator[None]:
    """An idempotency record refused as a duplicate: a first call with the key committed in
    the instant of our lookup (see Unit.claim), so ABORTED: a retry gets its answer."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if not key_taken(exc):
            raise
        raise Aborted("an idempotency_key was just used; retry to get its answer") from exc


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _line_key(line: Line) -> tuple[str, str]:
    return (line.sku, line.location_id)


def _reservation(row: asyncpg.Record, lines: Sequence[asyncpg.Record]) -> Reservation:
    ended: datetime | None = row["ended_at"]
    return Reservation(
        id=row["id"], status=ReservationStatus(row["status"]), channel=Channel(row["channel"]),
        order_ref=row["order_ref"],
        lines=tuple(Line(r["sku"], r["location_id"], r["quantity"]) for r in lines),
        created_at_ms=to_ms(row["created_at"]), expires_at_ms=to_ms(row["expires_at"]),
        ended_at_ms=to_ms(ended),
    )
