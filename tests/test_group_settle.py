"""Group commit of Commit and Release (app/group_settle.py): calls that end reservations while
Postgres is busy share one transaction, and each still gets its own answer (DESIGN I2, I6, I7)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from tests.conftest import make_world, uid
from tests.grpc_helpers import details
from tests.invariants import assert_invariants
from tests.test_group_commit import outcome, wait_until

# against the single server and against a Redis Cluster (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster

Stub = api_grpc.InventoryServiceStub


async def test_queued_ends_share_a_group_and_each_gets_its_own_answer(
    stub: Stub, service: Running, channel: grpc.aio.Channel,
) -> None:
    ends = service.reservations.ends
    w = await make_world(stub, locations=2, skus=1, on_hand=30)
    sku, hot, calm = w.skus[0], *w.locations

    async def reserve(loc: str, qty: int = 1) -> str:
        out = await stub.Reserve(api.ReserveRequest(
            lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
            order_ref=uid("o")))
        return str(out.reservation.id)

    sold = [await reserve(hot) for _ in range(6)]
    let_go = [await reserve(hot, 2) for _ in range(4)]
    raced = await reserve(calm)  # committed and released at once: one of them wins
    keyed = await reserve(calm, 3)
    commit_raw = channel.unary_unary("/inventory.v1.InventoryService/CommitReservation")
    keyed_request = api.CommitReservationRequest(reservation_id=keyed,
                                                 idempotency_key=uid("k")).SerializeToString()

    # While another transaction holds the hot row, the groups ending hot reservations wait in
    # Postgres (another lane opening as each stalls) and the calls after them queue.
    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM stock WHERE sku = $1 AND location_id = $2 FOR UPDATE",
                           sku, hot)
        commits = [asyncio.ensure_future(stub.CommitReservation(
            api.CommitReservationRequest(reservation_id=r))) for r in sold]
        releases = [asyncio.ensure_future(stub.ReleaseReservation(
            api.ReleaseReservationRequest(reservation_id=r))) for r in let_go]
        # 10 calls in at most `lanes` groups, or queued for the next: some group holds 3 or more
        await wait_until(lambda: ends.queued + ends.calls_in_flight == 10, "hot ends sent")
        race = [asyncio.ensure_future(outcome(stub.CommitReservation(
                    api.CommitReservationRequest(reservation_id=raced)))),
                asyncio.ensure_future(outcome(stub.ReleaseReservation(
                    api.ReleaseReservationRequest(reservation_id=raced))))]
        first = asyncio.ensure_future(commit_raw(keyed_request))
        unknown = asyncio.ensure_future(stub.CommitReservation(
            api.CommitReservationRequest(reservation_id=uid("r"))))
    committed = await asyncio.gather(*commits)
    released = await asyncio.gather(*releases)

    assert ends.largest >= 3, "the queued calls were not grouped"
    # Each sale has its own ledger row, and the rows count the shelf down one by one.
    afters = sorted(c.movements[0].on_hand_after for c in committed)
    assert afters == list(range(30 - 6, 30)), afters
    for c, r in zip(committed, sold, strict=True):
        assert c.reservation.id == r and c.reservation.status == pb.RESERVATION_STATUS_COMMITTED
        assert [(m.delta, m.reservation_id) for m in c.movements] == [(-1, r)]
    assert all(x.reservation.status == pb.RESERVATION_STATUS_RELEASED for x in released)
    # the same reservation ended twice at once: one wins, the other hears it is over
    assert sorted(c.name for c in await asyncio.gather(*race)) == ["FAILED_PRECONDITION", "OK"]
    with_key = bytes(await first)
    assert bytes(await commit_raw(keyed_request)) == with_key, "a repeat was not replayed"
    try:
        await unknown
        raise AssertionError("an unknown reservation was committed")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND

    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    levels = {lv.location_id: lv for lv in out.items[0].levels}
    assert (levels[hot].on_hand, levels[hot].reserved) == (24, 0)
    assert levels[calm].on_hand in (26, 27) and levels[calm].reserved == 0
    await assert_invariants(service, [sku])


async def test_a_refused_end_changes_nothing_and_says_why(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=5)
    sku, loc = w.skus[0], w.locations[0]
    out = await stub.Reserve(api.ReserveRequest(
        lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=2)]))
    res = out.reservation.id
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=res))
    try:
        await stub.CommitReservation(api.CommitReservationRequest(reservation_id=res))
        raise AssertionError("a released reservation was committed")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        failure = next(d for d in details(err) if hasattr(d, "violations"))
        assert failure.violations[0].type == "RESERVATION_NOT_ACTIVE"
    got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    lv = got.items[0].levels[0]
    assert (lv.on_hand, lv.reserved) == (5, 0)
    await assert_invariants(service, [sku])
