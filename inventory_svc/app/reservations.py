"""Reservations: a Redis hold first, then the Postgres commit (shared with concurrent calls:
group_commit); the hold is given back if Postgres refuses or fails (DESIGN §2). Lifecycle per I7:
ACTIVE → COMMITTED | RELEASED | EXPIRED, once."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from inventory_svc.app.context import Context
from inventory_svc.app.group_commit import GroupCommitter, reservation_event
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import InsufficientStock, Unavailable, quote
from inventory_svc.domain.model import (
    Channel,
    Line,
    Movement,
    MovementKind,
    Reservation,
    ReservationStatus,
    SkuQuantity,
    StockLevel,
)
from inventory_svc.domain.principal import ANONYMOUS, Principal
from inventory_svc.domain.rules import check_can_take, check_release
from inventory_svc.storage.pg import MovementDraft, PgStore
from inventory_svc.storage.pg_base import Idem, Replay
from inventory_svc.storage.redis_stock import Hold

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settled:
    """A reservation that ended in a sale, with its ledger rows."""

    reservation: Reservation
    movements: tuple[Movement, ...]


def new_reservation_id() -> str:
    # time-ordered so ids sort roughly by creation; 64 random bits make collisions moot
    return f"r{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


def _res_event(res: Reservation) -> tuple[str, str, dict[str, object]]:
    return ("", "", reservation_event(res))


class ReservationService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.group = GroupCommitter(ctx, max_group=s.group_commit_max,
                                    lanes=s.group_commit_lanes,
                                    stall_s=s.group_commit_stall_ms / 1000)

    async def close(self) -> None:
        await self.group.close()

    def _ttl(self, field: str, ttl_s: int, v: val.Violations) -> int:
        s = self.ctx.settings
        val.validate_ttl(v, field, ttl_s, s.min_ttl_s, s.max_ttl_s)
        return ttl_s or s.default_ttl_s

    async def reserve_routed(
        self, lines: Sequence[Line], ttl_s: int, channel: Channel, order_ref: str,
        idem: Idem | None, shipping_from: Sequence[str], answer: Callable[[Reservation], Any],
    ) -> Any:
        """A reservation of a routed plan: it uses one of each of `shipping_from`'s shipments
        of the day, in the same transaction."""
        return await self._take(lines, channel, order_ref, idem, ttl=ttl_s, sale=False,
                                shipping_from=shipping_from, answer=answer)

    async def reserve(
        self, lines: Sequence[Line], ttl_s: int, channel: Channel, order_ref: str,
        idem: Idem | None, *, principal: Principal = ANONYMOUS,
    ) -> Reservation | Replay:
        v = val.Violations()
        val.validate_lines(v, "lines", lines, self.ctx.settings.max_lines)
        ttl = self._ttl("ttl_seconds", ttl_s, v)
        v.text("order_ref", order_ref)
        v.raise_if_any()
        out: Reservation | Replay = await self._take(
            lines, channel, order_ref, idem, ttl=ttl, sale=False)
        return out

    async def sell(
        self, location_id: str, items: Sequence[SkuQuantity], channel: Channel, order_ref: str,
        idem: Idem | None, *, principal: Principal = ANONYMOUS,
    ) -> Settled | Replay:
        v = val.Violations()
        v.location_id("location_id", location_id)
        val.validate_items(v, "items", items, self.ctx.settings.max_lines)
        v.text("order_ref", order_ref)
        v.raise_if_any()
        await self.ctx.known_location(location_id)
        lines = [Line(x.sku, location_id, x.quantity) for x in items]
        out: Settled | Replay = await self._take(lines, channel, order_ref, idem, ttl=0, sale=True)
        return out

    async def _take(
        self, lines: Sequence[Line], channel: Channel, order_ref: str, idem: Idem | None, *,
        ttl: int, sale: bool, shipping_from: Sequence[str] = (),
        answer: Callable[[Reservation], Any] | None = None,
    ) -> Any:
        """Hold in Redis, then commit in Postgres: a reservation (with whatever others are
        going: group_commit), or with `sale` a POS sale. Given up after hold_timeout_s; then
        Redis learns what committed. `answer` turns the reservation into what the call returns
        and remembers for its key."""
        # The hold is recorded in Redis under the reservation's id, so the reconciler can tell
        # an orphaned hold (no reservation in Postgres, older than hold_timeout_s) from one in
        # flight; the call itself gives up after hold_timeout_s, so no commit comes later.
        res_id = new_reservation_id()
        timeout_s = self.ctx.settings.hold_timeout_s
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                hold = await self._hold(lines, channel, idem, res_id)
                if isinstance(hold, Replay):
                    return hold
                if not sale:
                    when = deadline.when()
                    assert when is not None
                    return await self.group.reserve(res_id, lines, channel, order_ref, ttl, idem,
                                                    hold, when, shipping_from, answer)
                out = await self._sell(res_id, hold, lines, channel, order_ref, idem)
        except TimeoutError as exc:
            raise Unavailable(f"postgres did not commit within {timeout_s:g}s; retry") from exc
        if isinstance(out, Replay):
            return out
        result, news = out
        # The held units become what the commit wrote: fewer on hand.
        await self.ctx.forget(hold, news)
        return result

    async def _hold(self, lines: Sequence[Line], channel: Channel, idem: Idem | None,
                    res_id: str) -> Hold | Replay:
        """The Redis hold comes first, so calls that lose on stock (a flash sale's many) never
        open a transaction. A keyed loser asks Postgres in one statement whether its key has an
        answer to replay (or a call with it still running) before it says "short"."""
        try:
            return await self.ctx.redis.hold(lines, pos=channel is Channel.POS,
                                             hydrate=self.ctx.hydrate, hold_id=res_id)
        except InsufficientStock:
            if idem is not None and (replay := await self.ctx.pg.replay_of(idem)):
                return Replay(replay)
            raise

    async def _sell(
        self, res_id: str, hold: Hold, lines: Sequence[Line], channel: Channel, order_ref: str,
        idem: Idem | None,
    ) -> tuple[Settled, list[StockLevel]] | Replay:
        """A POS sale of held lines, in its own transaction: the result and the committed
        levels."""
        sent_commit = False
        seen: list[StockLevel] = []  # the committed levels by which Postgres refused
        try:
            async with self.ctx.pg.unit(idem) as u:
                if u.replay is not None:  # a repeat: its units were taken by the first call
                    await self.ctx.give_back(hold)
                    return Replay(u.replay)
                rows = await PgStore.lock_stock(u.conn, [(x.sku, x.location_id) for x in lines])
                try:
                    check_can_take(lines, rows, channel)
                except InsufficientStock:
                    seen = [r.level for r in rows.values()]
                    raise
                news = await PgStore.write_levels(u.conn, [
                    replace(rows[(x.sku, x.location_id)].level,
                            on_hand=rows[(x.sku, x.location_id)].level.on_hand - x.quantity)
                    for x in lines])
                res = await PgStore.insert_reservation(
                    u.conn, res_id, ReservationStatus.COMMITTED, channel, order_ref, lines, 0)
                moves = await PgStore.add_movements(u.conn, [
                    MovementDraft(x.sku, x.location_id, -x.quantity, MovementKind.SALE,
                                  "pos sale", res_id, order_ref) for x in lines],
                    [n.on_hand for n in news])
                result = Settled(res, tuple(moves))
                await PgStore.add_outbox(u.conn, "RESERVATION", [_res_event(res)])
                await u.remember(result)
                sent_commit = True  # from here on a failure may come after the commit
        except BaseException:
            # Give back only what Postgres surely did not take. A failure during the commit
            # itself leaves the outcome unknown: the record stays, and the reconciler settles it
            # by what Postgres says.
            if seen:
                # Redis let through what Postgres refused (it had not yet seen a commit, or only
                # holds in flight were in the way): before the caller hears "short", Redis shows
                # the state that says so, as any read after the answer must.
                await self.ctx.publish(seen)
            if not sent_commit:
                await self.ctx.give_back(hold)
            raise
        return result, news

    async def get(self, res_id: str, *, principal: Principal = ANONYMOUS) -> Reservation:
        self._check_id(res_id)
        return await self.ctx.pg.get_reservation(res_id)

    async def extend(self, res_id: str, ttl_s: int, idem: Idem | None, *,
                     principal: Principal = ANONYMOUS) -> Reservation | Replay:
        v = val.Violations()
        self._check_id(res_id, v)
        ttl = self._ttl("ttl_seconds", ttl_s, v)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            res = await PgStore.lock_active(u.conn, res_id)
            await PgStore.extend(u.conn, res_id, ttl)
            res = await PgStore.read_reservation(u.conn, res_id, lock=False)
            await u.remember(res)
        return res

    async def release(
        self, res_id: str, lines: Sequence[Line], idem: Idem | None, *,
        principal: Principal = ANONYMOUS,
    ) -> Reservation | Replay:
        v = val.Violations()
        self._check_id(res_id, v)
        if lines:
            val.validate_lines(v, "lines", lines, self.ctx.settings.max_lines)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            res = await PgStore.lock_active(u.conn, res_id)
            held = {(x.sku, x.location_id): x.quantity for x in res.lines}
            check_release(held, lines)
            give = list(lines) if lines else [x for x in res.lines if x.quantity > 0]
            news = await self._unreserve(u.conn, give, sale=False)
            if lines:
                for x in lines:
                    held[(x.sku, x.location_id)] -= x.quantity
                await PgStore.set_lines_held(u.conn, res_id, held)
            if not lines or not any(held.values()):
                await PgStore.end_reservation(u.conn, res_id, ReservationStatus.RELEASED)
            res = await PgStore.read_reservation(u.conn, res_id, lock=False)
            await PgStore.add_outbox(u.conn, "RESERVATION", [_res_event(res)])
            await u.remember(res)
        await self.ctx.publish(news)
        return res

    async def commit(self, res_id: str, idem: Idem | None, *,
                     principal: Principal = ANONYMOUS) -> Settled | Replay:
        v = val.Violations()
        self._check_id(res_id, v)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            res = await PgStore.lock_active(u.conn, res_id)
            sold = [x for x in res.lines if x.quantity > 0]
            news = await self._unreserve(u.conn, sold, sale=True)
            moves = await PgStore.add_movements(u.conn, [
                MovementDraft(x.sku, x.location_id, -x.quantity, MovementKind.SALE, "commit",
                              res_id, res.order_ref) for x in sold],
                [{(n.sku, n.location_id): n.on_hand for n in news}[(x.sku, x.location_id)]
                 for x in sold])
            await PgStore.end_reservation(u.conn, res_id, ReservationStatus.COMMITTED)
            res = await PgStore.read_reservation(u.conn, res_id, lock=False)
            await PgStore.add_outbox(u.conn, "RESERVATION", [_res_event(res)])
            result = Settled(res, tuple(moves))
            await u.remember(result)
        await self.ctx.publish(news)
        return result

    async def expire_due(self) -> int:
        """Expire reservations past their Postgres `expires_at`; safe with N sweepers."""
        async with self.ctx.pg.unit(None) as u:
            ids = await PgStore.lock_due(u.conn, self.ctx.settings.sweep_batch)
            if not ids:
                return 0
            rows = await u.conn.fetch(
                "SELECT sku, location_id, quantity FROM reservation_lines"
                " WHERE reservation_id = ANY($1::text[]) AND quantity > 0", ids)
            lines = [Line(r["sku"], r["location_id"], r["quantity"]) for r in rows]
            news = await self._unreserve(u.conn, lines, sale=False)
            await u.conn.execute(
                "UPDATE reservations SET status = 'EXPIRED', ended_at = now()"
                " WHERE id = ANY($1::text[])", ids)
            await PgStore.add_outbox(u.conn, "RESERVATION", [
                ("", "", {"reservation_id": i, "status": "EXPIRED"}) for i in ids])
        await self.ctx.publish(news)
        log.info("expired %d reservations", len(ids))
        return len(ids)

    @staticmethod
    async def _unreserve(
        conn: asyncpg.Connection, lines: Sequence[Line], *, sale: bool
    ) -> list[StockLevel]:
        """Give back reserved units in Postgres (several lines may share a SKU-location)."""
        total: dict[tuple[str, str], int] = {}
        for x in lines:
            total[(x.sku, x.location_id)] = total.get((x.sku, x.location_id), 0) + x.quantity
        if not total:
            return []
        rows = await PgStore.lock_stock(conn, total)
        return await PgStore.write_levels(conn, [
            replace(rows[k].level, reserved=rows[k].level.reserved - q,
                    on_hand=rows[k].level.on_hand - (q if sale else 0))
            for k, q in sorted(total.items())])

    @staticmethod
    def _check_id(res_id: str, v: val.Violations | None = None) -> None:
        own = v or val.Violations()
        if not res_id or len(res_id) > 64 or "\x00" in res_id:
            own.add("reservation_id", f"{quote(res_id)} must be 1-64 characters, no NUL")
        if v is None:
            own.raise_if_any()
