"""Postgres side of returns (inside a unit): the sale a return names, what it sold and what came
back already, the lock that serialises returns against one sale, and the `returns` rows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import asyncpg

from inventory_svc.domain.errors import FailedPrecondition, NotFound
from inventory_svc.domain.model import ReservationStatus
from inventory_svc.domain.returns import Disposition, ReturnedLine, SaleBalance, SaleRef

# The two-key advisory locks are a keyspace apart from the one-key (bigint) locks that guard
# idempotency keys and migrations, so a client's key can never collide with a sale's lock.
RETURN_LOCK_SPACE = 0x5245_5455  # "RETU"


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big",
                          signed=True)


async def sale_of_reservation(conn: asyncpg.Connection, reservation_id: str) -> SaleRef:
    """The sale a reservation made: NOT_FOUND if unknown, FAILED_PRECONDITION unless COMMITTED
    (only a committed reservation sold anything; COMMITTED is final, so no lock is needed)."""
    row = await conn.fetchrow("SELECT status, order_ref FROM reservations WHERE id = $1",
                              reservation_id)
    if row is None:
        raise NotFound("reservation", reservation_id)
    if row["status"] != ReservationStatus.COMMITTED.value:
        raise FailedPrecondition(
            f"reservation {reservation_id!r} is {row['status']}, not COMMITTED: nothing was sold",
            violation_type="RESERVATION_NOT_COMMITTED", subject=reservation_id)
    return SaleRef(reservation_id, row["order_ref"])


async def lock_sale(conn: asyncpg.Connection, sale: SaleRef) -> None:
    """Wait for any other return against the same sale to end: two returns must not both see
    the same units as still returnable. Held until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1::int, $2::int)", RETURN_LOCK_SPACE,
                       _lock_key(sale.lock_name))


async def sale_balances(conn: asyncpg.Connection, sale: SaleRef) -> list[SaleBalance]:
    """The scopes `sale` belongs to, the one it names first: units sold by SKU (from the
    ledger's SALE movements, at any location) and units already returned (from `returns`)."""
    rows = await conn.fetch(
        "SELECT 'r' AS scope, true AS sold, sku, -sum(delta) AS n FROM movements"
        " WHERE $1 <> '' AND reservation_id = $1 AND kind = 'SALE' GROUP BY sku"
        " UNION ALL SELECT 'o', true, sku, -sum(delta) FROM movements"
        " WHERE $2 <> '' AND order_ref = $2 AND kind = 'SALE' GROUP BY sku"
        " UNION ALL SELECT 'r', false, sku, sum(quantity) FROM returns"
        " WHERE $1 <> '' AND reservation_id = $1 GROUP BY sku"
        " UNION ALL SELECT 'o', false, sku, sum(quantity) FROM returns"
        " WHERE $2 <> '' AND order_ref = $2 GROUP BY sku",
        sale.reservation_id, sale.order_ref)
    sold: dict[str, dict[str, int]] = {"r": {}, "o": {}}
    returned: dict[str, dict[str, int]] = {"r": {}, "o": {}}
    for r in rows:
        (sold if r["sold"] else returned)[r["scope"]][r["sku"]] = int(r["n"])
    if sale.reservation_id:
        out = [SaleBalance(str(sale), sold["r"], returned["r"])]
        if sale.order_ref:
            out.append(SaleBalance(f"order {sale.order_ref!r}", sold["o"], returned["o"]))
        return out
    if not sold["o"]:
        raise NotFound("order", sale.order_ref,
                       f"no sale with order_ref {sale.order_ref!r}: name a sold order")
    return [SaleBalance(str(sale), sold["o"], returned["o"])]


async def location_active(conn: asyncpg.Connection, location_id: str) -> bool | None:
    """Whether the location takes goods back (None: no such location). FOR SHARE: it cannot be
    deactivated while the return is booked."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT active FROM locations WHERE id = $1 FOR SHARE", location_id)


async def record_return(
    conn: asyncpg.Connection, return_id: str, sale: SaleRef, location_id: str,
    lines: Sequence[ReturnedLine], disposition: Disposition, principal: str,
    idempotency_key: str | None, reason: str,
) -> None:
    """One `returns` row per line, whatever the disposition: "already returned" is one query."""
    await conn.execute(
        "INSERT INTO returns (return_id, sku, reservation_id, order_ref, unmatched, location_id,"
        " quantity, disposition, principal, idempotency_key, reason)"
        " SELECT $1, x.sku, $2, $3, $4, $5, x.qty, $6, $7, $8, $9"
        " FROM unnest($10::text[], $11::bigint[]) AS x(sku, qty)",
        return_id, sale.reservation_id, sale.order_ref, sale.unmatched, location_id,
        disposition.value, principal, idempotency_key, reason,
        [x.sku for x in lines], [x.quantity for x in lines])
