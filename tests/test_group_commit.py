"""Group commit (app/group_commit.py): Reserve calls that queue while Postgres is busy share one
transaction, and each still gets its own answer (DESIGN I1, I2, I5, I6)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.domain.errors import Aborted, AlreadyExists, DomainError
from inventory_svc.domain.model import Line
from inventory_svc.server import Running
from inventory_svc.storage.pg_base import Idem, advisory_key
from inventory_svc.transport.inventory_servicer import idem_for
from tests.conftest import make_world, uid
from tests.grpc_helpers import details, expect_error
from tests.invariants import assert_invariants

# against the single server and against a Redis Cluster (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster

Stub = api_grpc.InventoryServiceStub


async def wait_until(ok: Callable[[], bool], what: str) -> None:
    """Poll a condition of the service (bounded), for a test that must line calls up."""
    for _ in range(2_000):
        if ok():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def outcome(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_queued_calls_commit_as_one_group_and_each_gets_its_own_answer(
    stub: Stub, service: Running, channel: grpc.aio.Channel,
) -> None:
    group = service.reservations.group
    w = await make_world(stub, locations=3, skus=1, on_hand=10)
    sku, hot, calm, free = w.skus[0], *w.locations
    raw = channel.unary_unary("/inventory.v1.InventoryService/Reserve")

    def keyed(qty: int, key: str) -> api.ReserveRequest:
        return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=calm,
                                                            quantity=qty)],
                                  idempotency_key=key, order_ref="o")

    def one(location: str) -> asyncio.Future[grpc.StatusCode]:
        return asyncio.ensure_future(outcome(stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=sku, location_id=location, quantity=1)]))))

    first, used = keyed(2, uid("k")), keyed(1, uid("k"))
    first_answer = bytes(await raw(first.SerializeToString()))
    await stub.Reserve(used)
    reused = keyed(4, used.idempotency_key)  # its key, a different request
    fresh = keyed(3, uid("k"))

    # While other transactions hold the hot and the calm row, a group on each waits in Postgres,
    # and the calls after them that want those rows queue: a group of their own would only
    # wait behind the first for the same lock. A call on another row still goes, in a lane of
    # its own, once the groups in Postgres have stalled.
    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM stock WHERE sku = $1 AND location_id = ANY($2::text[])"
                           " ORDER BY location_id FOR UPDATE", sku, [hot, calm])
        hot_calls = [one(hot)]
        await wait_until(lambda: group.in_flight == 1, "the first hot call in Postgres")
        repeat = asyncio.ensure_future(raw(first.SerializeToString()))
        await wait_until(lambda: group.in_flight == 2, "the repeat in a lane of its own")
        hot_calls += [one(hot) for _ in range(19)]
        refused = asyncio.ensure_future(expect_error(stub.Reserve(reused),
                                                     grpc.StatusCode.ALREADY_EXISTS))
        taken = asyncio.ensure_future(stub.Reserve(fresh))
        await wait_until(lambda: group.queued == 21, "the other hot and calm calls queued")
        assert await one(free) == grpc.StatusCode.OK  # committed while both rows are locked
        await wait_until(lambda: group.in_flight == 2, "the free call's group ended")
        assert (group.calls_in_flight, group.queued) == (2, 21), \
            "calls that want a locked row went to Postgres in a group of their own"
    codes = await asyncio.gather(*hot_calls)

    # Each call its own answer: the units went to exactly 10 of 20, the repeat replays the
    # first answer byte for byte, a reused key is refused, a fresh one commits.
    assert codes.count(grpc.StatusCode.OK) == 10, codes
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 10, codes
    assert bytes(await repeat) == first_answer
    assert used.idempotency_key in ((await refused).details() or "")
    assert len((await taken).reservation.lines) == 1
    assert group.largest >= 19, "the queued calls were not grouped"

    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    levels = {lv.location_id: lv for lv in out.items[0].levels}
    assert (levels[hot].reserved, levels[hot].available) == (10, 0)
    assert levels[calm].reserved == 2 + 1 + 3, "a refused or repeated call took units"
    assert levels[free].reserved == 1
    await assert_invariants(service, [sku])


async def test_the_call_a_group_cannot_serve_says_what_its_predecessors_left(
    stub: Stub, service: Running,
) -> None:
    group = service.reservations.group
    w = await make_world(stub, locations=1, skus=1, on_hand=5)
    sku, loc = w.skus[0], w.locations[0]

    async def reserve(qty: int) -> grpc.aio.AioRpcError | None:
        try:
            await stub.Reserve(api.ReserveRequest(lines=[
                pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)]))
        except grpc.aio.AioRpcError as err:
            return err
        return None

    # 4 + 2 units asked of 5: in Redis only holds in flight stand in the way of the last call,
    # so Postgres decides, in the groups, in the order their row locks are granted.
    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM stock WHERE sku = $1 FOR UPDATE", sku)
        calls = [asyncio.ensure_future(reserve(1)) for _ in range(4)]
        await wait_until(lambda: group.queued + group.calls_in_flight == 4,
                         "the first calls in Postgres or queued for their row")
        calls.append(asyncio.ensure_future(reserve(2)))
        await wait_until(lambda: group.queued + group.calls_in_flight == 5, "the last one sent")
    errors = [e for e in await asyncio.gather(*calls) if e is not None]

    assert len(errors) == 1, [e.details() for e in errors]
    err = errors[0]
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = next(d for d in details(err) if hasattr(d, "violations"))
    assert failure.violations[0].type == "INSUFFICIENT_STOCK"
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    reserved = out.items[0].levels[0].reserved
    assert reserved in (4, 5)  # the 2 refused, or a 1 decided after the 2
    said = re.search(r"requested (\d), available (\d+)", err.details() or "")
    assert said and (int(said[1]), int(said[2])) == (6 - reserved, 5 - reserved), err.details()
    await assert_invariants(service, [sku])


async def test_lookups_of_one_turn_share_a_statement_and_keep_their_own_answers(
    stub: Stub, service: Running,
) -> None:
    # A flash sale's keyed losers each ask Postgres for their key's first answer
    # (PgBase.replay_of); those asking in one turn of the event loop share one statement.
    w = await make_world(stub, locations=1, skus=1, on_hand=5)
    first = api.ReserveRequest(lines=[pb.ReservationLine(
        sku=w.skus[0], location_id=w.locations[0], quantity=2)], idempotency_key=uid("k"))
    answer = await stub.Reserve(first)
    other = api.ReserveRequest()
    other.CopyFrom(first)
    other.lines[0].quantity = 1
    running = api.ReserveRequest()
    running.CopyFrom(first)
    running.idempotency_key = uid("k")
    unused = api.ReserveRequest()
    unused.CopyFrom(first)
    unused.idempotency_key = uid("k")

    def idem(request: api.ReserveRequest) -> Idem:
        made = idem_for("Reserve", request, request.idempotency_key, lambda r: r)
        assert made is not None
        return made

    pg = service.ctx.pg
    async with pg.pool.acquire() as conn, conn.transaction():
        # a call with the key `running` is under way on another connection
        await conn.execute("SELECT pg_advisory_xact_lock($1)", advisory_key(running.idempotency_key))
        sends = pg.lookup_statements
        found = await asyncio.gather(
            *(pg.replay_of(idem(r)) for r in (first, unused, first)),
            expect_domain_error(pg.replay_of(idem(other)), AlreadyExists),
            expect_domain_error(pg.replay_of(idem(running)), Aborted))
        assert pg.lookup_statements == sends + 1
    assert found[:3] == [answer.SerializeToString(deterministic=True), None,
                         answer.SerializeToString(deterministic=True)]
    assert first.idempotency_key in found[3] and running.idempotency_key in found[4]


async def expect_domain_error(call: Awaitable[object], kind: type[DomainError]) -> str:
    try:
        await call
    except kind as err:
        return err.message
    raise AssertionError(f"expected {kind.__name__}")


async def test_the_holds_of_a_group_end_together_and_each_exactly_once(
    stub: Stub, service: Running,
) -> None:
    # A group commit ends its holds in one settle (one script on one server, one a slot on a
    # cluster), holds of the same SKU included; ending them again changes nothing.
    w = await make_world(stub, locations=1, skus=2, on_hand=10)
    (a, b), loc = w.skus, w.locations[0]
    redis, hydrate = service.ctx.redis, service.ctx.hydrate
    first = await redis.hold([Line(a, loc, 2), Line(b, loc, 2)], pos=False, hydrate=hydrate,
                             hold_id=uid("h"))
    second = await redis.hold([Line(a, loc, 3)], pos=False, hydrate=hydrate, hold_id=uid("h"))

    async def held() -> tuple[list[int], int]:
        cached, holds, _ = await redis.inspect(w.skus)
        return ([sum(c.held for c in cached[s] or ()) for s in w.skus],
                sum(len(recs) for recs in holds.values()))

    assert await held() == ([5, 2], 3)
    for _ in range(2):
        await redis.settle_many([(first, ()), (second, ())])
        assert await held() == ([0, 0], 0)
