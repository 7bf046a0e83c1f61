"""Group commit of Commit and (whole) Release: concurrent calls that end reservations share one
Postgres transaction, as Reserve calls do (group_commit).

Each call is still judged on the rows as they are, locked, before it is answered: the group
locks its reservations (in id order) and then their stock rows (in sku, location order), each
call is checked on its own (found and the caller's, ACTIVE, not past its expiry), and the calls
that pass end in one write statement. What one call does not pass is that call's answer; the
others commit. Two calls of one reservation, or with one idempotency key, never share a group:
the second must see what the first did.

A group costs a fixed number of round trips whatever its size: the key claims (if any call has
a key), the reservation lock, the stock lock, the give-back of shipments (if a released
reservation holds any), the write, the idempotency answers (if any call has a key) and the
COMMIT. One call alone used to take ten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import asyncpg
from prometheus_client import Histogram

from inventory_svc.app.batching import Lanes, group_failure
from inventory_svc.app.context import Context
from inventory_svc.app.group_commit import Progress, reservation_event
from inventory_svc.domain.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from inventory_svc.domain.model import (
    Movement,
    MovementKind,
    Reservation,
    ReservationStatus,
    StockLevel,
)
from inventory_svc.domain.rules import StockKey
from inventory_svc.storage import pg_capacity
from inventory_svc.storage.pg import MovementDraft, PgStore
from inventory_svc.storage.pg_base import Idem, Replay, lock_group_keys, to_ms
from inventory_svc.storage.pg_group import (
    Ending,
    LockedReservation,
    lock_reservations,
    store_answers,
    write_settlements,
)

log = logging.getLogger(__name__)
SETTLE_GROUP_SIZE = Histogram("inventory_group_settle_calls",
                              "Commit/Release calls per group transaction",
                              buckets=(1, 2, 4, 8, 16, 32, 64))


@dataclass(frozen=True, slots=True)
class Settled:
    """A reservation that ended in a sale, with its ledger rows."""

    reservation: Reservation
    movements: tuple[Movement, ...]


@dataclass(eq=False, slots=True)
class _End:
    """One Commit (`sale`) or whole Release waiting for, or in, a group."""

    res_id: str
    sale: bool
    idem: Idem | None
    owner: str | None  # None: the principal manages every reservation
    answer: asyncio.Future[Any]
    progress: Progress
    levels: list[StockLevel] = field(default_factory=list)


def judge(res_id: str, found: LockedReservation | None, owner: str | None) -> DomainError | None:
    """Why a reservation cannot end now, or None. Another owner's is NOT_FOUND exactly as an
    unknown id (the answer tells nothing of its existence)."""
    if found is None or (owner is not None and found.owner != owner):
        return NotFound("reservation", res_id)
    status = found.reservation.status
    if status is not ReservationStatus.ACTIVE:
        return FailedPrecondition(f"reservation {res_id!r} is {status.value}, not ACTIVE",
                                  violation_type="RESERVATION_NOT_ACTIVE", subject=res_id)
    if found.due:
        return FailedPrecondition(f"reservation {res_id!r} has expired",
                                  violation_type="RESERVATION_EXPIRED", subject=res_id)
    return None


class SettleCommitter(Lanes[_End]):
    def __init__(self, ctx: Context, *, max_group: int, lanes: int, stall_s: float) -> None:
        super().__init__(max_group=max_group, lanes=lanes, stall_s=stall_s, name="group settle")
        self.ctx = ctx

    def conflicts(self, call: _End) -> Iterable[str]:
        yield "r\0" + call.res_id
        if call.idem is not None:
            yield "k\0" + call.idem.key

    async def end(self, res_id: str, *, sale: bool, idem: Idem | None,
                  owner: str | None) -> Settled | Reservation | Replay:
        """Commit (`sale`) or release a whole reservation with whatever others are going: a
        Settled (commit) or the ended Reservation (release), or the Replay of a repeat."""
        timeout_s = self.ctx.settings.hold_timeout_s
        call = _End(res_id, sale, idem, owner, asyncio.get_running_loop().create_future(),
                    Progress())
        self.submit(call)
        try:
            async with asyncio.timeout(timeout_s):
                # (its own future: a caller that gives up cancels it, and its group then skips it)
                out = await call.answer
        except TimeoutError as exc:
            if not self.withdraw(call) and call.progress.sent:
                raise DeadlineExceeded(
                    f"postgres did not confirm the commit within {timeout_s:g}s: its outcome is "
                    "unknown; retry with the same idempotency_key to learn it") from exc
            raise Unavailable(f"postgres did not commit within {timeout_s:g}s; retry") from exc
        except asyncio.CancelledError:
            self.withdraw(call)
            raise
        if isinstance(out, BaseException):
            raise out
        result: Settled | Reservation | Replay = out
        return result

    async def run_group(self, group: list[_End]) -> None:
        sent = False
        answers: list[Any] = []
        try:
            async with self.ctx.pg.unit(None, group=True) as unit:  # keys: claimed for all at once
                answers = await self._decide(unit.conn, group)
                sent = True  # from here on a failure may come after the commit
                for c in group:
                    c.progress.sent = True
        except BaseException as exc:  # every call of the group hears it; nothing escapes
            failure = group_failure(exc, sent=sent,
                                    what=f"group settle of {len(group)} reservations")
            for c in group:
                _answer(c, failure)
            return
        self.counted(len(group))
        SETTLE_GROUP_SIZE.observe(len(group))
        try:
            # one Redis round trip for the group's new levels, before anyone hears OK: a read
            # after the answer sees the units back (or gone, for a sale)
            await self.ctx.publish([lv for c in group for lv in c.levels])
        finally:
            for c, a in zip(group, answers, strict=True):
                _answer(c, a)

    async def _decide(self, conn: asyncpg.Connection, group: list[_End]) -> list[Any]:
        """Inside the group's transaction: each call's answer, and the writes of those taken."""
        keys = await lock_group_keys(conn, [c.idem for c in group])
        # every call's reservation is locked, a repeat's too (it is rare): the lookup of the
        # keys rides in the same statement (storage/pg_group)
        found, now, stored = await lock_reservations(
            conn, [c.res_id for c in group], keys.to_look_up)
        answers: list[Any] = keys.answers(stored)  # None: not decided yet
        live = [i for i, a in enumerate(answers) if a is None]
        taken: list[tuple[int, LockedReservation]] = []
        for i in live:
            c = group[i]
            refusal = judge(c.res_id, found.get(c.res_id), c.owner)
            if refusal is not None:
                answers[i] = refusal
            else:
                taken.append((i, found[c.res_id]))
        if not taken:
            return answers
        # units given back per stock row: reserved falls by all of them, on_hand by the sold
        back: dict[StockKey, int] = {}
        sold: dict[StockKey, int] = {}
        for i, locked in taken:
            for x in locked.reservation.lines:
                if x.quantity > 0:
                    k = (x.sku, x.location_id)
                    back[k] = back.get(k, 0) + x.quantity
                    if group[i].sale:
                        sold[k] = sold.get(k, 0) + x.quantity
        rows = await PgStore.lock_stock(conn, back)
        shipments: dict[tuple[str, date], int] = {}
        for i, locked in taken:
            if not group[i].sale and locked.capacity_day is not None:
                for loc in locked.capacity_locations:
                    slot = (loc, locked.capacity_day)
                    shipments[slot] = shipments.get(slot, 0) + 1
        if shipments:
            await pg_capacity.give_back_capacity(conn, shipments)
        new = {k: (rows[k].level.on_hand - sold.get(k, 0), rows[k].level.reserved - q)
               for k, q in sorted(back.items())}
        # each sale's ledger row carries the on_hand after it: sales of one row in the group
        # count down from the row's level in the order of the group
        on_hand = {k: rows[k].level.on_hand for k in back}
        sales: list[tuple[MovementDraft, int]] = []
        endings: list[Ending] = []
        for i, locked in taken:
            c, res = group[i], locked.reservation
            status = ReservationStatus.COMMITTED if c.sale else ReservationStatus.RELEASED
            ended = Reservation(res.id, status, res.channel, res.order_ref, res.lines,
                                res.created_at_ms, res.expires_at_ms, to_ms(now))
            answers[i] = ended
            endings.append(Ending(res.id, status, reservation_event(ended)))
            if c.sale:
                for x in res.lines:
                    if x.quantity > 0:
                        k = (x.sku, x.location_id)
                        on_hand[k] -= x.quantity
                        sales.append((MovementDraft(x.sku, x.location_id, -x.quantity,
                                                    MovementKind.SALE, "commit", res.id,
                                                    res.order_ref), on_hand[k]))
        versions, moves = await write_settlements(
            conn, [(k, oh, rv) for k, (oh, rv) in new.items()], sales, endings)
        levels = {k: StockLevel(k[0], k[1], oh, rv, rows[k].level.safety_stock, *versions[k])
                  for k, (oh, rv) in new.items()}
        by_res: dict[str, list[Movement]] = {}
        for m in moves:
            by_res.setdefault(m.reservation_id, []).append(m)
        records: list[tuple[str, str, bytes, bytes]] = []
        for i, locked in taken:
            c = group[i]
            if c.sale:
                answers[i] = Settled(answers[i], tuple(by_res.get(c.res_id, ())))
            c.levels = [levels[(x.sku, x.location_id)] for x in locked.reservation.lines
                        if x.quantity > 0]
            if c.idem is not None:
                records.append((c.idem.key, c.idem.method, c.idem.fingerprint,
                                c.idem.encode(answers[i])))
        await store_answers(conn, records)
        return answers


def _answer(call: _End, answer: Any) -> None:
    if not call.answer.done():
        call.answer.set_result(answer)
