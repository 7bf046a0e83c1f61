"""Reservations: a Redis hold first, then the Postgres commit (shared with concurrent calls:
group_commit); the hold is given back if Postgres refuses or fails (DESIGN §2). Lifecycle per I7:
ACTIVE → COMMITTED | RELEASED | EXPIRED, once."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from inventory_svc.app import metrics
from inventory_svc.app.context import Context
from inventory_svc.app.group_commit import GroupCommitter, Progress, reservation_event
from inventory_svc.app.group_settle import SettleCommitter, Settled
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientStock,
    ResourceExhausted,
    Unavailable,
    quote,
)
from inventory_svc.domain.model import (
    Channel,
    Line,
    LocationType,
    MovementKind,
    Reservation,
    ReservationStatus,
    SkuQuantity,
    StockLevel,
)
from inventory_svc.domain.principal import ANONYMOUS, Principal
from inventory_svc.domain.rules import check_can_take, check_release
from inventory_svc.storage import pg_capacity
from inventory_svc.storage.pg import MovementDraft, PgStore
from inventory_svc.storage.pg_base import Idem, Replay
from inventory_svc.storage.redis_stock import Hold

log = logging.getLogger(__name__)


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
                                    stall_s=s.group_commit_stall_ms / 1000,
                                    at_once=s.group_commit_one_statement)
        self.ends = SettleCommitter(ctx, max_group=s.group_commit_max,
                                    lanes=s.group_commit_lanes,
                                    stall_s=s.group_commit_stall_ms / 1000)

    async def close(self) -> None:
        await self.group.close()
        await self.ends.close()

    def ttl_within_quota(self, principal: Principal, ttl_s: int) -> int:
        """The TTL of a (valid) request under the principal's max_ttl_s: asking for more is
        RESOURCE_EXHAUSTED; asking for none (0) gets the default, clamped to it."""
        cap = principal.quotas.max_ttl_s
        if cap and ttl_s > cap:
            raise ResourceExhausted(
                f"ttl_seconds {ttl_s} exceeds the principal's max_ttl_s quota of {cap}",
                subject="max_ttl_s")
        ttl = ttl_s or self.ctx.settings.default_ttl_s
        return min(ttl, cap) if cap else ttl

    async def check_holding_quotas(self, principal: Principal, units: int,
                                   idem: Idem | None) -> Replay | None:
        """Refuse a new reservation of `units` that would take the principal past its
        max_active_reservations or max_units_held (RESOURCE_EXHAUSTED naming the quota), before
        any hold. A repeat of a call that did reserve gets its answer, not the refusal its own
        reservation would now cause (I6). Principals without these quotas pay nothing.

        One indexed statement, not serialised with the principal's other calls: calls of one
        principal that run at once (on any replica) each count what had committed when they
        looked, so together they may overshoot by at most the calls in flight. Exact counting
        would need the principal's calls serialised across replicas (a lock held until the
        commit, and a statement taken after it: a round trip more for every quota-bound call
        and the group it shares a transaction with); the quotas bound abuse, not stock, which
        Postgres guards exactly."""
        q = principal.quotas
        if not (q.max_active_reservations or q.max_units_held):
            return None
        active, held = await self.ctx.pg.active_held(principal.name)
        refusal: ResourceExhausted | None = None
        if q.max_active_reservations and active + 1 > q.max_active_reservations:
            refusal = ResourceExhausted(
                f"principal {principal.name!r} has {active} active reservations: its "
                f"max_active_reservations quota of {q.max_active_reservations} allows no more",
                subject="max_active_reservations")
        elif q.max_units_held and held + units > q.max_units_held:
            refusal = ResourceExhausted(
                f"principal {principal.name!r} holds {held} units: {units} more would exceed its "
                f"max_units_held quota of {q.max_units_held}", subject="max_units_held")
        if refusal is None:
            return None
        if idem is not None and (replay := await self.ctx.pg.replay_of(idem)):
            return Replay(replay)
        raise refusal

    async def reserve_routed(
        self, lines: Sequence[Line], ttl_s: int, channel: Channel, order_ref: str,
        idem: Idem | None, shipping_from: Sequence[str], answer: Callable[[Reservation], Any],
        *, principal: Principal = ANONYMOUS,
    ) -> Any:
        """A reservation of a routed plan (the caller checked ttl and quotas): it uses one of
        each of `shipping_from`'s shipments of the day, in the same transaction, and holds
        them until it no longer holds units there."""
        principal.require_locations(dict.fromkeys(x.location_id for x in lines))
        return await self._take(lines, channel, order_ref, idem, ttl=ttl_s, sale=False,
                                shipping_from=shipping_from, answer=answer,
                                owner=principal.name)

    async def reserve(
        self, lines: Sequence[Line], ttl_s: int, channel: Channel, order_ref: str,
        idem: Idem | None, *, principal: Principal = ANONYMOUS,
    ) -> Reservation | Replay:
        v = val.Violations()
        val.validate_lines(v, "lines", lines, self.ctx.settings.max_lines)
        val.validate_ttl(v, "ttl_seconds", ttl_s, self.ctx.settings.min_ttl_s,
                         self.ctx.settings.max_ttl_s)
        v.text("order_ref", order_ref)
        v.raise_if_any()
        # before any hold: the scope, then the quotas (the query last)
        principal.require_locations(dict.fromkeys(x.location_id for x in lines))
        ttl = self.ttl_within_quota(principal, ttl_s)
        if replay := await self.check_holding_quotas(
                principal, sum(x.quantity for x in lines), idem):
            return replay
        out: Reservation | Replay = await self._take(
            lines, channel, order_ref, idem, ttl=ttl, sale=False, owner=principal.name)
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
        principal.require_locations([location_id])  # before telling whether it exists
        loc = await self.ctx.known_location(location_id)
        if loc.type is LocationType.WAREHOUSE or not loc.active:
            # about to refuse: not on a cache that may be behind another replica's change
            await self.ctx.refresh_locations()
            loc = self.ctx.location(location_id)
        # Walk-in sales happen at active stores: a warehouse has no shelf customers buy from.
        # Refused before any hold (Postgres refuses an inactive location too, but after one).
        if loc.type is LocationType.WAREHOUSE:
            raise FailedPrecondition(
                f"location {quote(location_id)} is a warehouse: it does not sell to walk-in "
                "customers (Sell is for stores)", violation_type="NOT_A_STORE",
                subject=location_id)
        if not loc.active:
            raise FailedPrecondition(f"location {quote(location_id)} is not active",
                                     violation_type="LOCATION_INACTIVE", subject=location_id)
        lines = [Line(x.sku, location_id, x.quantity) for x in items]
        out: Settled | Replay = await self._take(lines, channel, order_ref, idem, ttl=0, sale=True,
                                                 owner=principal.name)
        return out

    async def _take(
        self, lines: Sequence[Line], channel: Channel, order_ref: str, idem: Idem | None, *,
        ttl: int, sale: bool, shipping_from: Sequence[str] = (),
        answer: Callable[[Reservation], Any] | None = None, owner: str = "",
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
        progress = Progress()
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                hold = await self._hold(lines, channel, idem, res_id)
                if isinstance(hold, Replay):
                    return hold
                if not sale:
                    when = deadline.when()
                    assert when is not None
                    return await self.group.reserve(res_id, lines, channel, order_ref, ttl, idem,
                                                    hold, when, shipping_from, answer,
                                                    owner=owner, progress=progress)
                out = await self._sell(res_id, hold, lines, channel, order_ref, idem, owner,
                                       progress)
        except TimeoutError as exc:
            if progress.sent:
                raise DeadlineExceeded(
                    f"postgres did not confirm the commit within {timeout_s:g}s: its outcome is "
                    "unknown; retry with the same idempotency_key to learn it") from exc
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
        open a transaction. A keyed loser says "short" at once when Redis's key filter shows its
        key never took stock; otherwise it asks Postgres in one statement whether its key has an
        answer to replay (or a call with it still running) first."""
        try:
            return await self.ctx.redis.hold(lines, pos=channel is Channel.POS,
                                             hydrate=self.ctx.hydrate, hold_id=res_id,
                                             key=idem.key if idem is not None else "")
        except InsufficientStock as short:
            if idem is None:
                raise
            metrics.KEYED_SHORT.labels("key_filter" if short.key_unused else "postgres").inc()
            if not short.key_unused and (replay := await self.ctx.pg.replay_of(idem)):
                return Replay(replay)
            raise

    async def _sell(
        self, res_id: str, hold: Hold, lines: Sequence[Line], channel: Channel, order_ref: str,
        idem: Idem | None, owner: str, progress: Progress,
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
                    u.conn, res_id, ReservationStatus.COMMITTED, channel, order_ref, lines, 0,
                    owner=owner)
                moves = await PgStore.add_movements(u.conn, [
                    MovementDraft(x.sku, x.location_id, -x.quantity, MovementKind.SALE,
                                  "pos sale", res_id, order_ref) for x in lines],
                    [n.on_hand for n in news])
                result = Settled(res, tuple(moves))
                await PgStore.add_outbox(u.conn, "RESERVATION", [_res_event(res)])
                await u.remember(result)
                sent_commit = progress.sent = True  # from here a failure may follow the commit
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

    # get / extend / release / commit: a reservation of another owner is NOT_FOUND, exactly as
    # an unknown id, unless the principal manages all of them (principal.owner is None). The
    # owner is part of the one (locked) read, so it costs no statement.

    async def get(self, res_id: str, *, principal: Principal = ANONYMOUS) -> Reservation:
        self._check_id(res_id)
        return await self.ctx.pg.get_reservation(res_id, owner=principal.owner)

    async def extend(self, res_id: str, ttl_s: int, idem: Idem | None, *,
                     principal: Principal = ANONYMOUS) -> Reservation | Replay:
        v = val.Violations()
        self._check_id(res_id, v)
        val.validate_ttl(v, "ttl_seconds", ttl_s, self.ctx.settings.min_ttl_s,
                         self.ctx.settings.max_ttl_s)
        v.raise_if_any()
        ttl = self.ttl_within_quota(principal, ttl_s)
        cap = principal.quotas.max_extensions
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            await PgStore.lock_active(u.conn, res_id, owner=principal.owner)
            if await PgStore.extend(u.conn, res_id, ttl) > cap > 0:
                # raised inside the unit: the transaction, and the extension, roll back
                raise ResourceExhausted(
                    f"reservation {quote(res_id)} was extended {cap} times: the principal's "
                    f"max_extensions quota of {cap} allows no more", subject="max_extensions")
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
        if not lines:  # the whole reservation: with whatever other ends are going
            out = await self.ends.end(res_id, sale=False, idem=idem, owner=principal.owner)
            assert not isinstance(out, Settled)
            return out
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            act = await PgStore.lock_active_held(u.conn, res_id, owner=principal.owner)
            res = act.reservation
            held = {(x.sku, x.location_id): x.quantity for x in res.lines}
            check_release(held, lines)
            give = list(lines) if lines else [x for x in res.lines if x.quantity > 0]
            news = await self._unreserve(u.conn, give, sale=False)
            if lines:
                for x in lines:
                    held[(x.sku, x.location_id)] -= x.quantity
                await PgStore.set_lines_held(u.conn, res_id, held)
            ended = not lines or not any(held.values())
            if ended:
                await PgStore.end_reservation(u.conn, res_id, ReservationStatus.RELEASED)
            if act.capacity_locations and act.capacity_day is not None:
                # a location's shipment is given back once no unit is held there any more
                still = set() if ended else {k[1] for k, q in held.items() if q > 0}
                back = [x for x in act.capacity_locations if x not in still]
                if back:
                    await pg_capacity.give_back_capacity(
                        u.conn, {(x, act.capacity_day): 1 for x in back})
                    await pg_capacity.set_capacity_held(
                        u.conn, res_id, [x for x in act.capacity_locations if x in still])
            res = await PgStore.read_reservation(u.conn, res_id, lock=False)
            await PgStore.add_outbox(u.conn, "RESERVATION", [_res_event(res)])
            await u.remember(res)
        await self.ctx.publish(news)
        return res

    async def commit(self, res_id: str, idem: Idem | None, *,
                     principal: Principal = ANONYMOUS) -> Settled | Replay:
        """Sell what a reservation holds (its shipments are kept: they happen now), with
        whatever other ends are going (group_settle)."""
        v = val.Violations()
        self._check_id(res_id, v)
        v.raise_if_any()
        out = await self.ends.end(res_id, sale=True, idem=idem, owner=principal.owner)
        assert not isinstance(out, Reservation)
        return out

    async def expire_due(self) -> int:
        """Expire reservations past their Postgres `expires_at`; safe with N sweepers."""
        async with self.ctx.pg.unit(None, quiet=True) as u:  # (most sweeps expire nothing)
            ids = await PgStore.lock_due(u.conn, self.ctx.settings.sweep_batch)
            if not ids:
                return 0
            rows = await u.conn.fetch(
                "SELECT sku, location_id, quantity FROM reservation_lines"
                " WHERE reservation_id = ANY($1::text[]) AND quantity > 0", ids)
            lines = [Line(r["sku"], r["location_id"], r["quantity"]) for r in rows]
            news = await self._unreserve(u.conn, lines, sale=False)
            # the shipments they held, by (location, day taken), are given back (after the
            # stock rows: the order every path locks stock and capacity rows in)
            slots = await u.conn.fetch(
                "WITH old AS (SELECT id, capacity_day, capacity_locations FROM reservations"
                "  WHERE id = ANY($1::text[])),"
                " upd AS (UPDATE reservations r SET status = 'EXPIRED', ended_at = now(),"
                "  capacity_locations = '{}' FROM old WHERE r.id = old.id"
                "  RETURNING old.capacity_day AS day, old.capacity_locations AS locs)"
                " SELECT loc, day, count(*)::int AS n FROM upd, unnest(upd.locs) AS loc"
                " WHERE day IS NOT NULL GROUP BY loc, day", ids)
            if slots:
                await pg_capacity.give_back_capacity(
                    u.conn, {(r["loc"], r["day"]): r["n"] for r in slots})
            await PgStore.add_outbox(u.conn, "RESERVATION", [
                ("", "", {"reservation_id": i, "status": "EXPIRED"}) for i in ids])
        self.ctx.pg.committed()
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
