"""Capacity follows the reservation (DESIGN §5, §8: no client holds capacity it is not using):
RouteAndReserve takes a shipment of the day of each location it ships from; releasing or
expiring the reservation gives it back on the day it was taken, a commit keeps it, and a pickup
store handing over its own shelf takes none of its own."""

from __future__ import annotations

import asyncio
from datetime import date

import asyncpg
import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.server import Running
from tests.conftest import store_location, uid
from tests.grpc_helpers import expect_error
from tests.invariants import assert_invariants

Stub = api_grpc.InventoryServiceStub
NEAR = (52.23, 21.01)


async def _stores(stub: Stub, n: int, **kw: object) -> list[str]:
    ids = [uid("CAP") for _ in range(n)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(x, **kw) for x in ids]))
    return ids


async def _stock(stub: Stub, loc: str, on_hand: int = 10) -> str:
    sku = uid("SKU")
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=on_hand))
    return sku


def _ship(*lines: tuple[str, int], **kw: object) -> rp.RouteAndReserveRequest:
    return rp.RouteAndReserveRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=s, quantity=q) for s, q in lines],
        dest_lat=NEAR[0], dest_lon=NEAR[1]), **kw)  # type: ignore[arg-type]


def _pickup(at: str, *lines: tuple[str, int]) -> rp.RouteAndReserveRequest:
    return rp.RouteAndReserveRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=s, quantity=q) for s, q in lines],
        method=rp.FULFILMENT_METHOD_PICKUP, pickup_location_id=at))


async def _held(pool: asyncpg.Pool, res_id: str) -> tuple[date | None, list[str]]:
    row = await pool.fetchrow(
        "SELECT capacity_day, capacity_locations FROM reservations WHERE id = $1", res_id)
    return row["capacity_day"], sorted(row["capacity_locations"])


async def _used(pool: asyncpg.Pool, loc: str, day: date) -> int:
    used = await pool.fetchval(
        "SELECT used FROM capacity_usage WHERE location_id = $1 AND day = $2", loc, day)
    return int(used or 0)


async def _wait_expired(stub: Stub, res_id: str, polls: int = 300) -> None:
    """Poll the reservation (the sweeper runs every 0.1 s in tests) until it is EXPIRED."""
    for _ in range(polls):
        got = await stub.GetReservation(api.GetReservationRequest(reservation_id=res_id))
        if got.reservation.status == pb.RESERVATION_STATUS_EXPIRED:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{res_id} did not expire after {polls} polls")


async def test_release_gives_the_shipment_back(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    pool = service.ctx.pg.pool
    (store,) = await _stores(stub, 1, daily_capacity=1)
    sku = await _stock(stub, store)
    first = (await routing.RouteAndReserve(_ship((sku, 1)))).reservation
    day, locs = await _held(pool, first.id)
    assert day is not None and locs == [store] and await _used(pool, store, day) == 1
    # the store's one shipment of the day is taken: nobody else can route there
    await expect_error(routing.RouteAndReserve(_ship((sku, 1))),
                       grpc.StatusCode.FAILED_PRECONDITION)
    # the cart is abandoned: the slot comes back, and the next order gets it
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=first.id))
    assert await _used(pool, store, day) == 0 and await _held(pool, first.id) == (day, [])
    second = (await routing.RouteAndReserve(_ship((sku, 1)))).reservation
    assert await _used(pool, store, day) == 1
    # a commit keeps it: the shipment happens
    await stub.CommitReservation(api.CommitReservationRequest(reservation_id=second.id))
    assert await _used(pool, store, day) == 1
    assert await _held(pool, second.id) == (day, [store])
    await assert_invariants(service, [sku])


async def test_expiry_gives_the_shipment_back(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    pool = service.ctx.pg.pool
    (store,) = await _stores(stub, 1, daily_capacity=1)
    sku = await _stock(stub, store)
    res = (await routing.RouteAndReserve(_ship((sku, 2), ttl_seconds=1))).reservation
    day, _ = await _held(pool, res.id)
    assert day is not None and await _used(pool, store, day) == 1
    await _wait_expired(stub, res.id)
    # expired and given back in one transaction: seen together
    assert await _used(pool, store, day) == 0 and await _held(pool, res.id) == (day, [])
    again = await routing.RouteAndReserve(_ship((sku, 2)))
    assert [s.location_id for s in again.plan.shipments] == [store]
    await assert_invariants(service, [sku])


async def test_partial_release_keeps_the_slot_while_units_stay_there(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    pool = service.ctx.pg.pool
    s1, s2 = await _stores(stub, 2, daily_capacity=5)
    a, b = await _stock(stub, s1), await _stock(stub, s2)
    res = (await routing.RouteAndReserve(_ship((a, 2), (b, 2)))).reservation
    day, locs = await _held(pool, res.id)
    assert day is not None and locs == sorted([s1, s2])
    assert (await _used(pool, s1, day), await _used(pool, s2, day)) == (1, 1)

    async def release(sku: str, loc: str, qty: int) -> None:
        await stub.ReleaseReservation(api.ReleaseReservationRequest(
            reservation_id=res.id, lines=[pb.ReservationLine(sku=sku, location_id=loc,
                                                             quantity=qty)]))

    await release(a, s1, 1)  # one unit still held at s1: its shipment stays
    assert (await _used(pool, s1, day), await _used(pool, s2, day)) == (1, 1)
    await release(a, s1, 1)  # nothing left at s1: its shipment goes back, s2's stays
    assert (await _used(pool, s1, day), await _used(pool, s2, day)) == (0, 1)
    assert await _held(pool, res.id) == (day, [s2])
    await release(b, s2, 2)  # the last units: released in full, every slot back
    assert (await _used(pool, s1, day), await _used(pool, s2, day)) == (0, 0)
    got = await stub.GetReservation(api.GetReservationRequest(reservation_id=res.id))
    assert got.reservation.status == pb.RESERVATION_STATUS_RELEASED
    await assert_invariants(service, [a, b])


async def test_pickup_from_own_shelf_needs_none_of_the_stores_shipments(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    pool = service.ctx.pg.pool
    (store,) = await _stores(stub, 1, daily_capacity=1)
    (warehouse,) = await _stores(stub, 1, type=pb.LOCATION_TYPE_WAREHOUSE, can_pickup=False,
                                 lat=52.20, lon=20.95, daily_capacity=3)
    shipped, shelf = await _stock(stub, store), await _stock(stub, store)
    far = await _stock(stub, warehouse)
    # the store ships its one parcel of the day
    sent = (await routing.RouteAndReserve(_ship((shipped, 1)))).reservation
    day, _ = await _held(pool, sent.id)
    assert day is not None and await _used(pool, store, day) == 1

    # a customer collecting there takes units off the shelf: no shipment, none needed
    dry = await routing.RouteOrder(rp.RouteOrderRequest(order=_pickup(store, (shelf, 2)).order))
    assert [s.location_id for s in dry.plan.shipments] == [store]
    assert store not in {x.location_id for x in dry.excluded}
    got = await routing.RouteAndReserve(_pickup(store, (shelf, 2)))
    assert [(x.location_id, x.quantity) for x in got.reservation.lines] == [(store, 2)]
    assert await _held(pool, got.reservation.id) == (None, [])
    assert await _used(pool, store, day) == 1

    # a transfer to the store is a shipment of the warehouse, not of the store
    moved = await routing.RouteAndReserve(_pickup(store, (far, 1)))
    assert await _held(pool, moved.reservation.id) == (day, [warehouse])
    assert (await _used(pool, store, day), await _used(pool, warehouse, day)) == (1, 1)
    # and giving it back gives back the warehouse's, never the store's
    await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=moved.reservation.id))
    await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=got.reservation.id))
    assert (await _used(pool, store, day), await _used(pool, warehouse, day)) == (1, 0)
    await assert_invariants(service, [shipped, shelf, far])
