"""Returns (issue 10 §2): goods come back against the sale that sold them, never more than it
sold, at any active location the caller may act at. SELLABLE goods go back on the shelf with a
RETURN movement; INSPECTION and WRITE_OFF goods are booked as returned and nothing else."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import asyncpg

from inventory_svc.app.context import Context
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import FailedPrecondition, NotFound, PermissionDenied
from inventory_svc.domain.model import Movement, MovementKind, SkuQuantity, StockLevel
from inventory_svc.domain.principal import ANONYMOUS, Principal
from inventory_svc.domain.returns import Disposition, ReturnedLine, SaleRef, check_return
from inventory_svc.storage import pg_returns
from inventory_svc.storage.pg import MovementDraft, PgStore
from inventory_svc.storage.pg_base import Idem, Replay

UNMATCHED = "unmatched return"  # how the ledger tells a return with no sale behind it


@dataclass(frozen=True, slots=True)
class ReturnResult:
    """A booked return: its id, the sale it names, its lines, and (SELLABLE only) the changed
    stock levels with their RETURN movements."""

    return_id: str
    sale: SaleRef
    disposition: Disposition
    lines: tuple[ReturnedLine, ...]
    levels: tuple[StockLevel, ...]
    movements: tuple[Movement, ...]


def new_return_id() -> str:
    # time-ordered like reservation ids; 64 random bits make collisions moot
    return f"t{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


def check_reference(v: val.Violations, reservation_id: str, order_ref: str,
                    unmatched: bool) -> None:
    """Exactly one of reservation_id, order_ref and unmatched names what is returned."""
    given = [f for f, on in (("reservation_id", bool(reservation_id)),
                             ("order_ref", bool(order_ref)), ("unmatched", unmatched)) if on]
    if len(given) != 1:
        what = ("exactly one of reservation_id, order_ref and unmatched must name what is"
                f" returned ({'none' if not given else ', '.join(given)} given)")
        for f in given or ["reservation_id", "order_ref", "unmatched"]:
            v.add(f, what)
    if reservation_id and (len(reservation_id) > 64 or "\x00" in reservation_id):
        v.add("reservation_id", f"{reservation_id[:80]!r} must be 1-64 characters, no NUL")
    v.text("order_ref", order_ref)


class ReturnService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def return_items(
        self, location_id: str, items: Sequence[SkuQuantity], *, reservation_id: str = "",
        order_ref: str = "", unmatched: bool = False,
        disposition: Disposition = Disposition.SELLABLE, reason: str = "",
        idem: Idem | None = None, principal: Principal = ANONYMOUS,
    ) -> ReturnResult | Replay:
        v = val.Violations()
        v.location_id("location_id", location_id)
        val.validate_items(v, "items", items, self.ctx.settings.max_lines)
        check_reference(v, reservation_id, order_ref, unmatched)
        v.text("reason", reason)
        v.raise_if_any()
        principal.require_locations([location_id])
        if unmatched and not principal.manages_all:
            raise PermissionDenied(
                f"principal {principal.name!r} ({principal.role.value}) may not book a return"
                " with no sale behind it: name the reservation_id or order_ref it returns")
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            active = await pg_returns.location_active(u.conn, location_id)
            if active is None:
                raise NotFound("location", location_id)
            if not active:
                raise FailedPrecondition(f"location {location_id!r} is not active",
                                         violation_type="LOCATION_INACTIVE", subject=location_id)
            if reservation_id:
                sale = await pg_returns.sale_of_reservation(u.conn, reservation_id)
            else:
                sale = SaleRef(order_ref=order_ref)
            if sale.unmatched:
                lines = check_return(items, ())
            else:
                await pg_returns.lock_sale(u.conn, sale)
                lines = check_return(items, await pg_returns.sale_balances(u.conn, sale))
            return_id = new_return_id()
            await pg_returns.record_return(
                u.conn, return_id, sale, location_id, lines, disposition, principal.name,
                idem.key if idem else None, reason)
            news: list[StockLevel] = []
            moves: list[Movement] = []
            if disposition is Disposition.SELLABLE:
                news, moves = await self._restock(u.conn, sale, location_id, items, reason)
            await PgStore.add_outbox(u.conn, "RETURN", [("", location_id, {
                "return_id": return_id, "reservation_id": sale.reservation_id,
                "order_ref": sale.order_ref, "unmatched": sale.unmatched,
                "disposition": disposition.value, "principal": principal.name,
                "lines": {x.sku: x.quantity for x in lines}})])
            result = ReturnResult(return_id, sale, disposition, lines, tuple(news), tuple(moves))
            await u.remember(result)
        await self.ctx.publish(news)
        return result

    @staticmethod
    async def _restock(
        conn: asyncpg.Connection, sale: SaleRef, location_id: str,
        items: Sequence[SkuQuantity], reason: str,
    ) -> tuple[list[StockLevel], list[Movement]]:
        """SELLABLE goods back on the shelf at the return location (its stock rows made if
        need be), each with its RETURN movement and STOCK_CHANGED event."""
        rows = await PgStore.lock_stock(
            conn, [(x.sku, location_id) for x in items], create=True)
        news = await PgStore.write_levels(conn, [
            replace(rows[(x.sku, location_id)].level,
                    on_hand=rows[(x.sku, location_id)].level.on_hand + x.quantity)
            for x in items])
        note = reason or "return"
        if sale.unmatched:
            note = f"{UNMATCHED}: {reason}" if reason else UNMATCHED
        moves = await PgStore.add_movements(conn, [
            MovementDraft(x.sku, location_id, x.quantity, MovementKind.RETURN, note,
                          sale.reservation_id, sale.order_ref) for x in items],
            [n.on_hand for n in news])
        # the STOCK_CHANGED payload of every stock write (app/stock.py)
        await PgStore.add_outbox(conn, "STOCK_CHANGED", [
            (n.sku, n.location_id, {"on_hand": n.on_hand, "reserved": n.reserved,
                                    "safety_stock": n.safety_stock, "version": n.version})
            for n in news])
        return news, moves
