"""Group commit of reservations: concurrent Reserve and RouteAndReserve calls, each already
holding its units in Redis, share one Postgres transaction.

Each call's rows are still locked, checked and written in Postgres before it is answered (I5),
so a group is no weaker than one call per transaction: the group's row locks are taken together
in (sku, location) order, each call is checked in arrival order against the levels its
predecessors in the group left, and the calls that pass are written in one statement. What one
call does not pass (short, no shipment left today, a key in use, a repeat) is that call's
answer; the others commit. The gain is in the fixed costs: one BEGIN/COMMIT, one WAL flush, one
lock statement, one write statement and one Redis round trip for the group instead of for each
call.

A group of plain Reserve calls (no shipment of the day to take) first tries less: one statement,
no transaction, that writes the whole group only if Postgres has everything it asks
(storage/pg_group.reserve_at_once): one round trip where the transaction takes four or five.
When that statement writes nothing, the group goes the locked way, which answers call by call.

How groups form is batching.Lanes. Measured (benchmarks/RESULTS.md): one group at a time served
1.6x the Reserve calls of four at a time, at 40 % less CPU a call, because four lanes made groups
of 1.6 calls and made them queue for each other's row locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from inventory_svc.app.batching import Lanes, group_failure
from inventory_svc.app.context import Context
from inventory_svc.domain.errors import (
    DomainError,
    InsufficientStock,
    Unavailable,
)
from inventory_svc.domain.model import Channel, Line, Reservation, ReservationStatus, StockLevel
from inventory_svc.domain.rules import LockedStock, StockKey, check_can_take, check_capacity
from inventory_svc.storage import pg_capacity
from inventory_svc.storage.pg import NewReservation, PgStore
from inventory_svc.storage.pg_base import (
    Idem,
    Replay,
    idempotency_row,
    lock_group_keys,
    to_ms,
)
from inventory_svc.storage.pg_group import Want, lock_stock_and_answers, reserve_at_once
from inventory_svc.storage.redis_stock import Hold

log = logging.getLogger(__name__)
GROUP_SIZE = Histogram("inventory_group_commit_calls", "Reservations per group commit",
                       buckets=(1, 2, 4, 8, 16, 32, 64))
GROUPS = Counter("inventory_group_commits", "Reservation group commits by how they went: in one"
                 " statement, refused by it (and then run in a transaction), in a transaction",
                 ["way"])

Answer = Any  # what the call returns (a Reservation, or `answer_of` it), a Replay, or an error


@dataclass(slots=True)
class Progress:
    """How far a call got: once `sent`, its commit may have happened, so a call that gives up
    after that cannot say "nothing was confirmed" (UNAVAILABLE) but "outcome unknown"."""

    sent: bool = False


@dataclass(eq=False, slots=True)
class _Call:
    """One reservation call waiting for, or in, a group."""

    res_id: str
    lines: Sequence[Line]
    channel: Channel
    order_ref: str
    ttl_s: int
    idem: Idem | None
    hold: Hold
    deadline: float  # loop time by which the call gives up (its hold_timeout_s)
    shipping_from: Sequence[str]  # locations it uses a shipment of the day of (routing)
    answer_of: Callable[[Reservation], Any] | None  # what the call returns for its reservation
    answer: asyncio.Future[Answer]
    owner: str  # the principal that makes the reservation
    progress: Progress
    committed: list[StockLevel] = field(default_factory=list)  # its rows after the commit
    seen: list[StockLevel] = field(default_factory=list)  # the levels by which it was refused

    def take(self, created_ms: int) -> tuple[Answer, NewReservation]:
        """The call's answer and its write, were it taken at `created_ms` (Postgres' time)."""
        res = Reservation(
            self.res_id, ReservationStatus.ACTIVE, self.channel, self.order_ref,
            tuple(sorted(self.lines, key=lambda x: (x.sku, x.location_id))),
            created_ms, created_ms + self.ttl_s * 1000, 0)
        result = res if self.answer_of is None else self.answer_of(res)
        return result, NewReservation(res, reservation_event(res),
                                      idempotency_row(self.idem, result), self.owner,
                                      tuple(self.shipping_from))


def reservation_event(res: Reservation) -> dict[str, object]:
    return {"reservation_id": res.id, "status": res.status.value, "order_ref": res.order_ref}


class GroupCommitter(Lanes[_Call]):
    def __init__(self, ctx: Context, *, max_group: int, lanes: int, stall_s: float,
                 at_once: bool = True) -> None:
        super().__init__(max_group=max_group, lanes=lanes, stall_s=stall_s, name="group commit")
        self.ctx = ctx
        self.at_once = at_once  # plain groups try one statement first (_run_at_once)
        self.ways: collections.Counter[str] = collections.Counter()  # GROUPS, per process

    def conflicts(self, call: _Call) -> Iterable[str]:
        # two calls with one key go in different groups: the second must see the first's
        # answer, which its group's advisory lock would not keep from it
        return (call.idem.key,) if call.idem else ()

    def rows(self, call: _Call) -> Iterable[object]:
        return [(line.sku, line.location_id) for line in call.lines]

    async def reserve(
        self, res_id: str, lines: Sequence[Line], channel: Channel, order_ref: str, ttl_s: int,
        idem: Idem | None, hold: Hold, deadline: float, shipping_from: Sequence[str] = (),
        answer_of: Callable[[Reservation], Any] | None = None, *, owner: str = "",
        progress: Progress | None = None,
    ) -> Any:
        """Commit a held reservation with whatever other calls are going; its hold is forgotten
        or given back in Redis before it returns (or by its group, if the call gave up). Returns
        the reservation (or `answer_of` it), or the Replay of a repeat. The reservation belongs
        to `owner` and holds a shipment of the day at each of `shipping_from` (given back when
        it no longer holds units there: see ReservationService.release and expire_due)."""
        call = _Call(res_id, lines, channel, order_ref, ttl_s, idem, hold, deadline,
                     shipping_from, answer_of, asyncio.get_running_loop().create_future(), owner,
                     progress or Progress())
        self.submit(call)
        try:
            # (its own future: a caller that gives up cancels it, and its group then skips it)
            out = await call.answer
        except asyncio.CancelledError:
            if self.withdraw(call):  # never sent: Postgres surely did not take it
                await self.ctx.give_back(hold)
            # sent: its group ends it in Redis, by what Postgres did
            raise
        if isinstance(out, BaseException):
            raise out
        return out

    async def run_group(self, group: list[_Call]) -> None:
        if self.at_once and not any(c.shipping_from for c in group):
            created = self.ctx.pg.clock.now_ms()
            if created is not None and await self._run_at_once(group, created):
                return
        await self._run_locked(group)

    async def _run_at_once(self, group: list[_Call], created: int) -> bool:
        """The group as one statement (storage/pg_group.reserve_at_once), its calls answered;
        False when that statement wrote nothing (a row short or missing in Postgres, a key in
        use or repeated): the group then goes the locked way, which answers each call."""
        decided = [c.take(created) for c in group]
        answers = [answer for answer, _ in decided]
        taken = [write for _, write in decided]
        units: collections.Counter[StockKey] = collections.Counter()
        buffered: set[StockKey] = set()  # rows a remote channel takes from
        for c in group:
            for x in c.lines:
                units[(x.sku, x.location_id)] += x.quantity
                if c.channel is not Channel.POS:
                    buffered.add((x.sku, x.location_id))
        wants = [Want(k, n, k in buffered) for k, n in units.items()]
        sent = False
        try:
            async with asyncio.timeout_at(min(c.deadline for c in group)):
                async with self.ctx.pg.connection(group=True, in_deadline=True) as conn:
                    sent = True  # the statement is its own commit
                    for c in group:
                        c.progress.sent = True
                    levels, now = await reserve_at_once(conn, taken, wants)
        except BaseException as exc:
            await self._fail(group, exc, sent=sent)
            return True
        if now is not None:
            self.ctx.pg.clock.saw(now)
        if levels is None:
            self._went("refused_one_statement")
            for c in group:
                c.progress.sent = False
            return False
        self._went("one_statement")
        self.ctx.pg.committed()  # (a statement of its own: no unit tells it)
        news = {(lv.sku, lv.location_id): lv for lv in levels}
        for c in group:
            c.committed = [news[(x.sku, x.location_id)] for x in c.lines]
        await self._finish(group, answers)
        return True

    async def _run_locked(self, group: list[_Call]) -> None:
        """The group in a transaction that locks, decides call by call, and writes."""
        sent = False
        answers: list[Answer]
        try:
            async with asyncio.timeout_at(min(c.deadline for c in group)):
                async with self.ctx.pg.unit(None, group=True, in_deadline=True) as unit:
                    # (keys: claimed for all at once)
                    answers = await self._decide(unit.conn, group)
                    sent = True  # from here on a failure may come after the commit
                    for c in group:
                        c.progress.sent = True
        except BaseException as exc:  # every call of the group hears it; nothing escapes
            await self._fail(group, exc, sent=sent)
            return
        self._went("transaction")
        await self._finish(group, answers)

    def _went(self, way: str) -> None:
        GROUPS.labels(way).inc()
        self.ways[way] += 1

    async def _fail(self, group: list[_Call], exc: BaseException, *, sent: bool) -> None:
        failure = group_failure(exc, sent=sent, what=f"group commit of {len(group)} reservations")
        # A failure during the commit itself leaves the outcome unknown: the hold records
        # stay, and the reconciler settles them by what Postgres says.
        try:
            if not sent:
                await self._end_in_redis([(c.hold, []) for c in group], [])
        finally:
            for c in group:
                _answer(c, failure)

    async def _finish(self, group: list[_Call], answers: list[Answer]) -> None:
        self.counted(len(group))
        GROUP_SIZE.observe(len(group))
        # Refused calls' Redis first shows the state that refused them, as any read after the
        # answer must; held units become committed levels or are given back; one round trip.
        try:
            await self._end_in_redis([(c.hold, c.committed) for c in group],
                                     [lv for c in group for lv in c.seen])
        finally:
            for c, a in zip(group, answers, strict=True):
                _answer(c, a)

    async def _decide(self, conn: asyncpg.Connection, group: list[_Call]) -> list[Answer]:
        """Inside the group's transaction: each call's answer, and the write of those taken."""
        keys = await lock_group_keys(conn, [c.idem for c in group])
        # every call's rows are locked, a repeat's too (it is rare): the lookup of the keys
        # rides in the same statement (storage/pg_group)
        rows, now, stored = await lock_stock_and_answers(
            conn, {(x.sku, x.location_id) for c in group for x in c.lines}, keys.to_look_up)
        self.ctx.pg.clock.saw(now)
        answers: list[Answer] = keys.answers(stored)  # None: not decided yet
        live = [i for i, a in enumerate(answers) if a is None]
        shipping = sorted({loc for i in live for loc in group[i].shipping_from})
        used = await pg_capacity.lock_capacity(conn, shipping) if shipping else {}
        capacity = {loc: self.ctx.locations[loc].daily_capacity
                    for loc in shipping if loc in self.ctx.locations}
        created = to_ms(now)
        taken: list[NewReservation] = []
        changed: dict[StockKey, StockLevel] = {}
        for i in live:
            c = group[i]
            try:
                check_can_take(c.lines, rows, c.channel)
                check_capacity(c.shipping_from, used, capacity)
            except DomainError as exc:
                answers[i] = exc
                continue
            answers[i], write = c.take(created)
            taken.append(write)
            for loc in c.shipping_from:
                used[loc] = used.get(loc, 0) + 1
            for x in c.lines:
                k = (x.sku, x.location_id)
                lv = replace(rows[k].level, reserved=rows[k].level.reserved + x.quantity)
                rows[k] = LockedStock(lv, rows[k].location_active)
                changed[k] = lv
        if shipping and taken:
            await pg_capacity.write_capacity(conn, used)
        news = {(lv.sku, lv.location_id): lv for lv in await PgStore.write_reservations(
            conn, taken, [changed[k] for k in sorted(changed)])} if taken else {}
        for c, a in zip(group, answers, strict=True):
            mine = [(x.sku, x.location_id) for x in c.lines]
            if not isinstance(a, BaseException | Replay):
                c.committed = [news[k] for k in mine]
            elif isinstance(a, InsufficientStock):
                c.seen = [news.get(k) or rows[k].level for k in mine if k in rows]
        return answers

    async def _end_in_redis(self, settled: list[tuple[Hold, Sequence[StockLevel]]],
                            levels: list[StockLevel]) -> None:
        try:
            await asyncio.shield(self.ctx.redis.settle_many(settled, levels))
        except Unavailable as exc:
            log.warning("ending %d redis holds failed, the reconciler will repair them: %s",
                        len(settled), exc)


def _answer(call: _Call, answer: Answer) -> None:
    if not call.answer.done():
        call.answer.set_result(answer)
