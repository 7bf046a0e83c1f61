"""The Postgres-only peer of `inventory-bench --peer` (benchmarks/peer): over real gRPC against
real Postgres, on a database of its own made by our migrations, it reserves, commits, releases
and reads availability correctly, keeps our idempotency semantics, refuses oversell under
concurrency (one-line and multi-line calls, rows locked in one order: no deadlock), and leaves
our invariants (I1-I3) holding. No timings are asserted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio

from benchmarks.load import invariants
from benchmarks.load.stack import fresh_database, with_database
from benchmarks.peer.server import Running, serve
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from tests.conftest import Stores, store_location, uid
from tests.grpc_helpers import expect_error, shortfalls


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def peer_db(stores: Stores) -> str:
    name = f"peer_{uid('t').replace('-', '_').lower()}"
    await fresh_database(stores.database_url, name)
    return with_database(stores.database_url, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def peer(peer_db: str) -> AsyncIterator[Running]:
    # no sweeper: the expiry test runs it itself, at the moment it chooses
    async with serve(peer_db, pool_size=8, sweep_interval_s=0) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pstub(peer: Running) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{peer.port}") as ch:
        yield api_grpc.InventoryServiceStub(ch)


async def _world(stub: Any, *, skus: int = 1, on_hand: int = 10, safety: int = 0
                 ) -> tuple[str, list[str]]:
    loc = uid("L")
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(loc, default_safety_stock=safety)]))
    names = [uid("SKU") for _ in range(skus)]
    for sku in names:
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=on_hand))
    return loc, names


async def _level(stub: Any, sku: str, channel: int = pb.CHANNEL_WEB) -> pb.StockLevel:
    resp = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku], channel=channel))
    (item,) = resp.items
    (level,) = item.levels
    return level


def _line(sku: str, loc: str, qty: int) -> pb.ReservationLine:
    return pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)


async def _invariants_hold(peer_db: str) -> None:
    inv = await invariants.check(peer_db)
    assert inv["ok"], inv
    assert inv["oversold"] == inv["reserved_mismatch"] == inv["ledger_mismatch"] == 0


async def test_reserve_commit_release_and_availability(pstub: Any, peer_db: str) -> None:
    loc, (a, b) = await _world(pstub, skus=2, on_hand=10, safety=2)
    level = await _level(pstub, a)
    assert (level.on_hand, level.reserved, level.safety_stock, level.available) == (10, 0, 2, 8)
    assert (await _level(pstub, a, pb.CHANNEL_POS)).available == 10  # POS sells the buffer

    held = (await pstub.Reserve(api.ReserveRequest(
        lines=[_line(b, loc, 1), _line(a, loc, 3)], ttl_seconds=60, order_ref="o-1"))).reservation
    assert held.status == pb.RESERVATION_STATUS_ACTIVE
    assert [(x.sku, x.quantity) for x in held.lines] == sorted([(a, 3), (b, 1)])
    assert held.expires_at_unix_ms - held.created_at_unix_ms == 60_000
    assert ((await _level(pstub, a)).reserved, (await _level(pstub, a)).available) == (3, 5)
    got = (await pstub.GetReservation(api.GetReservationRequest(reservation_id=held.id)))
    assert got.reservation == held

    done = await pstub.CommitReservation(api.CommitReservationRequest(reservation_id=held.id))
    assert done.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert done.reservation.ended_at_unix_ms > 0
    assert sorted((m.sku, m.delta, m.kind, m.on_hand_after) for m in done.movements) == sorted(
        [(a, -3, pb.MOVEMENT_KIND_SALE, 7), (b, -1, pb.MOVEMENT_KIND_SALE, 9)])
    level = await _level(pstub, a)
    assert (level.on_hand, level.reserved, level.available) == (7, 0, 5)

    other = (await pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 4)]))).reservation
    assert (await _level(pstub, a)).reserved == 4
    gone = await pstub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=other.id))
    assert gone.reservation.status == pb.RESERVATION_STATUS_RELEASED
    level = await _level(pstub, a)
    assert (level.on_hand, level.reserved) == (7, 0)

    # an ended reservation cannot end again; an unknown one is not found
    err = await expect_error(pstub.CommitReservation(
        api.CommitReservationRequest(reservation_id=other.id)), grpc.StatusCode.FAILED_PRECONDITION)
    assert "RELEASED" in (err.details() or "")
    await expect_error(pstub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id="r-nope")), grpc.StatusCode.NOT_FOUND)
    await expect_error(pstub.Reserve(api.ReserveRequest(lines=[_line(uid("SKU"), loc, 1)])),
                       grpc.StatusCode.NOT_FOUND)
    await _invariants_hold(peer_db)


async def test_refusals_say_what_is_short_and_take_nothing(pstub: Any, peer_db: str) -> None:
    loc, (a, b) = await _world(pstub, skus=2, on_hand=5, safety=1)
    err = await expect_error(pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 5)])),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(a, loc, 5, 4)]  # the safety unit is kept
    # all or nothing: b is short, so a is not taken either
    err = await expect_error(pstub.Reserve(api.ReserveRequest(
        lines=[_line(a, loc, 2), _line(b, loc, 9)])), grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(b, loc, 9, 4)]
    assert (await _level(pstub, a)).reserved == 0
    # POS may take the safety unit
    await pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 5)], channel=pb.CHANNEL_POS))
    assert (await _level(pstub, a)).reserved == 5
    await expect_error(pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 0)])),
                       grpc.StatusCode.INVALID_ARGUMENT)
    await _invariants_hold(peer_db)


async def test_idempotency_same_answer_other_request_refused(pstub: Any, peer_db: str) -> None:
    loc, (a, b) = await _world(pstub, skus=2, on_hand=10)
    req = api.ReserveRequest(lines=[_line(a, loc, 2)], ttl_seconds=60, idempotency_key=uid("k"))
    first = await pstub.Reserve(req)
    again = await pstub.Reserve(req)
    assert again.SerializeToString() == first.SerializeToString()
    assert (await _level(pstub, a)).reserved == 2  # taken once
    other = api.ReserveRequest(lines=[_line(a, loc, 3)], ttl_seconds=60,
                               idempotency_key=req.idempotency_key)
    await expect_error(pstub.Reserve(other), grpc.StatusCode.ALREADY_EXISTS)

    # a repeat still gets its answer once the stock is gone
    await pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 8)]))
    assert (await pstub.Reserve(req)).SerializeToString() == first.SerializeToString()

    commit = api.CommitReservationRequest(reservation_id=first.reservation.id,
                                          idempotency_key=uid("k"))
    done = await pstub.CommitReservation(commit)
    assert (await pstub.CommitReservation(commit)).SerializeToString() == done.SerializeToString()
    assert (await _level(pstub, a)).on_hand == 8  # sold once
    await expect_error(pstub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=first.reservation.id, idempotency_key=commit.idempotency_key)),
        grpc.StatusCode.ALREADY_EXISTS)

    held = (await pstub.Reserve(api.ReserveRequest(lines=[_line(b, loc, 1)]))).reservation
    release = api.ReleaseReservationRequest(reservation_id=held.id, idempotency_key=uid("k"))
    gone = await pstub.ReleaseReservation(release)
    assert (await pstub.ReleaseReservation(release)).SerializeToString() == \
        gone.SerializeToString()
    await _invariants_hold(peer_db)


async def test_no_oversell_under_concurrency(pstub: Any, peer_db: str) -> None:
    """50 concurrent one-unit Reserves of 10 units: exactly 10 are taken."""
    loc, (a,) = await _world(pstub, on_hand=10)
    calls = [pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 1)], idempotency_key=uid("f")))
             for _ in range(50)]
    out = await asyncio.gather(*calls, return_exceptions=True)
    ok = [x for x in out if isinstance(x, api.ReserveResponse)]
    refused = [x for x in out if isinstance(x, grpc.aio.AioRpcError)]
    assert len(ok) == 10, out
    assert {x.code() for x in refused} == {grpc.StatusCode.FAILED_PRECONDITION}, refused
    assert len(ok) + len(refused) == 50
    level = await _level(pstub, a)
    assert (level.on_hand, level.reserved) == (10, 10)
    await _invariants_hold(peer_db)


async def test_multi_line_reserves_in_any_order_neither_oversell_nor_deadlock(
        pstub: Any, peer_db: str) -> None:
    """Two-line carts over the same two rows, named in both orders, at once: rows are locked in
    one order, so none waits on another in a cycle (no ABORTED deadlock); all or nothing."""
    loc, (a, b) = await _world(pstub, skus=2, on_hand=10)
    calls = [pstub.Reserve(api.ReserveRequest(
        lines=[_line(a, loc, 1), _line(b, loc, 1)] if i % 2 else [_line(b, loc, 1), _line(a, loc, 1)]))
        for i in range(40)]
    out = await asyncio.gather(*calls, return_exceptions=True)
    ok = [x for x in out if isinstance(x, api.ReserveResponse)]
    refused = [x for x in out if isinstance(x, grpc.aio.AioRpcError)]
    assert len(ok) == 10
    assert {x.code() for x in refused} == {grpc.StatusCode.FAILED_PRECONDITION}, refused
    assert ((await _level(pstub, a)).reserved, (await _level(pstub, b)).reserved) == (10, 10)
    # and commits and releases of them at once, in both orders too
    settle = [pstub.CommitReservation(api.CommitReservationRequest(reservation_id=x.reservation.id))
              if i % 2 else
              pstub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=x.reservation.id))
              for i, x in enumerate(ok)]
    assert all(not isinstance(x, BaseException)
               for x in await asyncio.gather(*settle, return_exceptions=True))
    level = await _level(pstub, a)
    assert (level.on_hand, level.reserved) == (5, 0)
    await _invariants_hold(peer_db)


async def test_expired_reservations_are_swept_back(pstub: Any, peer: Running, peer_db: str) -> None:
    loc, (a,) = await _world(pstub, on_hand=10)
    held = (await pstub.Reserve(api.ReserveRequest(lines=[_line(a, loc, 4)],
                                                    ttl_seconds=60))).reservation
    conn = await asyncpg.connect(peer_db)
    try:  # due now, without waiting for the clock
        await conn.execute("UPDATE reservations SET expires_at = now() - interval '1 second'"
                           " WHERE id = $1", held.id)
    finally:
        await conn.close()
    err = await expect_error(pstub.CommitReservation(
        api.CommitReservationRequest(reservation_id=held.id)), grpc.StatusCode.FAILED_PRECONDITION)
    assert "expired" in (err.details() or "")
    assert await peer.peer.expire_due() >= 1
    got = (await pstub.GetReservation(api.GetReservationRequest(reservation_id=held.id)))
    assert got.reservation.status == pb.RESERVATION_STATUS_EXPIRED
    assert (await _level(pstub, a)).reserved == 0
    await _invariants_hold(peer_db)


@pytest.mark.parametrize("method", ["FindNearby", "Sell"])
async def test_calls_the_peer_lacks_are_unimplemented(pstub: Any, method: str) -> None:
    request = api.FindNearbyRequest() if method == "FindNearby" else api.SellRequest()
    await expect_error(getattr(pstub, method)(request), grpc.StatusCode.UNIMPLEMENTED)
