"""Group commit (app/group_commit.py): Reserve calls that queue while Postgres is busy share one
transaction, and each still gets its own answer (DESIGN I1, I2, I5, I6)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from tests.conftest import make_world, uid
from tests.grpc_helpers import details, expect_error
from tests.invariants import assert_invariants

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
    w = await make_world(stub, locations=2, skus=1, on_hand=10)
    sku, hot, calm = w.skus[0], *w.locations
    raw = channel.unary_unary("/inventory.v1.InventoryService/Reserve")

    def keyed(qty: int, key: str) -> api.ReserveRequest:
        return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=calm,
                                                            quantity=qty)],
                                  idempotency_key=key, order_ref="o")

    first, used = keyed(2, uid("k")), keyed(1, uid("k"))
    first_answer = bytes(await raw(first.SerializeToString()))
    await stub.Reserve(used)
    reused = keyed(4, used.idempotency_key)  # its key, a different request
    fresh = keyed(3, uid("k"))

    # While another transaction holds the hot row, the first groups wait in Postgres and the
    # calls after them queue.
    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM stock WHERE sku = $1 AND location_id = $2 FOR UPDATE",
                           sku, hot)
        hot_calls = [asyncio.ensure_future(outcome(stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=sku, location_id=hot, quantity=1)])))) for _ in range(20)]
        await wait_until(lambda: group.in_flight == group.groups_in_flight
                         and group.queued == 20 - group.groups_in_flight, "hot calls queued")
        repeat = asyncio.ensure_future(raw(first.SerializeToString()))
        refused = asyncio.ensure_future(expect_error(stub.Reserve(reused),
                                                     grpc.StatusCode.ALREADY_EXISTS))
        taken = asyncio.ensure_future(stub.Reserve(fresh))
        await wait_until(lambda: group.queued == 20 - group.groups_in_flight + 3,
                         "keyed calls queued")
    codes = await asyncio.gather(*hot_calls)

    # Each call its own answer: the units went to exactly 10 of 20, the repeat replays the
    # first answer byte for byte, a reused key is refused, a fresh one commits.
    assert codes.count(grpc.StatusCode.OK) == 10, codes
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 10, codes
    assert bytes(await repeat) == first_answer
    assert used.idempotency_key in ((await refused).details() or "")
    assert len((await taken).reservation.lines) == 1
    assert group.largest >= 20 - group.groups_in_flight + 3, "the queued calls were not grouped"

    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    levels = {lv.location_id: lv for lv in out.items[0].levels}
    assert (levels[hot].reserved, levels[hot].available) == (10, 0)
    assert levels[calm].reserved == 2 + 1 + 3, "a refused or repeated call took units"
    await assert_invariants(service, [sku])


async def test_a_short_call_in_a_group_says_what_was_available(
    stub: Stub, service: Running,
) -> None:
    group = service.reservations.group
    w = await make_world(stub, locations=1, skus=1, on_hand=5)
    sku, loc = w.skus[0], w.locations[0]

    def reserve(qty: int) -> Awaitable[api.ReserveResponse]:
        return stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)]))

    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM stock WHERE sku = $1 FOR UPDATE", sku)
        blockers = [asyncio.ensure_future(reserve(1)) for _ in range(group.groups_in_flight)]
        await wait_until(lambda: group.in_flight == group.groups_in_flight, "groups waiting")
        # in Redis only holds in flight stand in its way, so Postgres decides, in the group
        short = asyncio.ensure_future(expect_error(reserve(5),
                                                   grpc.StatusCode.FAILED_PRECONDITION))
        await wait_until(lambda: group.queued == 1, "the short call queued")
    await asyncio.gather(*blockers)
    err = await short
    failure = next(d for d in details(err) if hasattr(d, "violations"))
    assert failure.violations[0].type == "INSUFFICIENT_STOCK"
    # decided in Postgres after 1 to all of the blockers' groups, as their row locks went
    said = re.search(r"requested 5, available (\d+)", err.details() or "")
    assert said and 5 - group.groups_in_flight <= int(said[1]) < 5, err.details()
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    assert out.items[0].levels[0].reserved == group.groups_in_flight
    await assert_invariants(service, [sku])
