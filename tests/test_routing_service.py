"""RoutingService over gRPC: dry runs explain themselves; RouteAndReserve never oversells and never
exceeds daily capacity under contention."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.server import Running
from routing.geo import haversine_km
from tests.conftest import store_location, uid
from tests.grpc_helpers import bad_fields, expect_error, shortfalls
from tests.invariants import assert_invariants

# against the single server and against a Redis Cluster (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster

WAW = (52.2297, 21.0122)


async def network(stub: api_grpc.InventoryServiceStub, **overrides: dict[str, object]) -> dict[str, str]:
    """A warehouse in Warsaw, a store nearby, a warehouse in Poznań (far)."""
    ids = {"wh": uid("WH"), "st": uid("ST"), "far": uid("FAR")}
    specs = {
        "wh": dict(type=pb.LOCATION_TYPE_WAREHOUSE, lat=52.20, lon=20.95, fixed_cost=12.0,
                   cost_per_km=0.03, cost_per_unit=0.5, priority=10, can_pickup=False,
                   daily_capacity=0),
        "st": dict(lat=52.23, lon=21.01, fixed_cost=25.0, cost_per_km=0.04, cost_per_unit=3.0,
                   priority=50, daily_capacity=0),
        "far": dict(type=pb.LOCATION_TYPE_WAREHOUSE, lat=52.41, lon=16.93, fixed_cost=12.0,
                    cost_per_km=0.03, cost_per_unit=0.5, priority=5, can_pickup=False,
                    daily_capacity=0),
    }
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(ids[k], **{**specs[k], **overrides.get(k, {})}) for k in specs]))
    return ids


async def test_route_order_explains_plan_and_exclusions(
    stub: api_grpc.InventoryServiceStub, channel: grpc.aio.Channel
) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    ids = await network(stub, far={"active": False})
    sku = uid("SKU")
    for key, qty in (("wh", 5), ("st", 2), ("far", 50)):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=ids[key], on_hand=qty))
    out = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=4)], dest_lat=WAW[0], dest_lon=WAW[1],
        excluded_location_ids=[])))
    (ship,) = out.plan.shipments
    assert ship.location_id == ids["wh"] and ship.lines[0].quantity == 4
    dist = haversine_km(52.20, 20.95, *WAW)
    assert math.isclose(ship.distance_km, dist, rel_tol=1e-9)
    assert math.isclose(out.plan.total_cost, 12.0 + 0.03 * dist + 0.5 * 4, rel_tol=1e-9)
    reasons = {x.location_id: x.reason for x in out.excluded}
    assert reasons.get(ids["far"]) == rp.EXCLUSION_REASON_INACTIVE
    assert all(a.total_cost >= out.plan.total_cost for a in out.alternatives)

    none = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=40)], dest_lat=WAW[0], dest_lon=WAW[1])))
    assert not none.HasField("plan")
    assert [(s.sku, s.requested, s.obtainable) for s in none.shortfall] == [(sku, 40, 7)]

    err = await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=1)], dest_lat=float("nan"), dest_lon=0))),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert any(f.startswith("order.dest_lat") for f in bad_fields(err))


async def test_plans_follow_every_change_of_stock(
    stub: api_grpc.InventoryServiceStub, channel: grpc.aio.Channel
) -> None:
    """Routing keeps each SKU's column of availability while the SKU's Redis hash has not
    changed: a count, a hold, a release and a sale must each show in the next plan."""
    routing = rp_grpc.RoutingServiceStub(channel)
    ids = await network(stub, far={"active": False})
    sku = uid("SKU")
    for key, qty in (("wh", 5), ("st", 5)):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=ids[key], on_hand=qty))

    async def plan(qty: int) -> list[tuple[str, int]]:
        out = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
            lines=[rp.OrderLine(sku=sku, quantity=qty)], dest_lat=WAW[0], dest_lon=WAW[1])))
        return sorted((s.location_id, s.lines[0].quantity) for s in out.plan.shipments)

    assert await plan(4) == [(ids["wh"], 4)]
    assert await plan(4) == [(ids["wh"], 4)]  # the same hash: the kept column
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=ids["wh"], on_hand=3))
    assert ids["wh"] not in dict(await plan(4)), "a count did not reach routing"
    held = await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=ids["st"], quantity=5)]))
    assert ids["st"] not in dict(await plan(3)), "a reservation did not reach routing"
    await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=held.reservation.id))
    assert await plan(5) == [(ids["st"], 5)], "a release did not reach routing"
    sold = await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=ids["st"], quantity=5)]))
    await stub.CommitReservation(api.CommitReservationRequest(
        reservation_id=sold.reservation.id))
    assert ids["st"] not in dict(await plan(3)), "a sale did not reach routing"


async def test_route_and_reserve_under_contention(service: Running) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") for _ in range(4)]
    try:
        stub = api_grpc.InventoryServiceStub(channels[0])
        ids = await network(stub, st={"daily_capacity": 3})
        skus = [uid("SKU"), uid("SKU")]
        for sku in skus:
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=ids["wh"], on_hand=6))
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=ids["st"], on_hand=6))

        async def order(i: int) -> tuple[str, rp.RouteAndReserveResponse | None, list[object]]:
            routing = rp_grpc.RoutingServiceStub(channels[i % len(channels)])
            try:
                got = await routing.RouteAndReserve(rp.RouteAndReserveRequest(
                    order=rp.RoutingOrder(lines=[rp.OrderLine(sku=skus[0], quantity=1),
                                                 rp.OrderLine(sku=skus[1], quantity=1)],
                                          dest_lat=WAW[0], dest_lon=WAW[1]),
                    idempotency_key=uid("rr")))
                return "ok", got, []
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                return "refused", None, list(shortfalls(err))

        results = await asyncio.gather(*(order(i) for i in range(30)))
        won = [r[1] for r in results if r[0] == "ok"]
        # 6 units per SKU at the warehouse + at most 3 store shipments (capacity) of 1 unit each
        assert len(won) == 9, [r[0] for r in results]
        for r in results:
            if r[0] == "refused":
                assert r[2], "a refusal must say which line is short"
        used_store = sum(1 for w in won if w and any(
            s.location_id == ids["st"] for s in w.plan.shipments))
        assert used_store <= 3
        for w in won:
            assert w is not None
            assert w.reservation.status == pb.RESERVATION_STATUS_ACTIVE
            plan_units = sorted((s.location_id, ln.sku, ln.quantity)
                                for s in w.plan.shipments for ln in s.lines)
            held = sorted((x.location_id, x.sku, x.quantity) for x in w.reservation.lines)
            assert plan_units == held
        await assert_invariants(service, skus)
    finally:
        for c in channels:
            await c.close()


async def test_pickup_uses_own_shelf_then_transfers_and_suggests_stores(
    stub: api_grpc.InventoryServiceStub, channel: grpc.aio.Channel
) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    # P's shelf is cheap to pick from, so under the §5 cost its own units come first
    ids = await network(stub, st={"cost_per_unit": 0.1})
    other = uid("ST2")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(other, lat=52.24, lon=21.03, cost_per_unit=3.0, can_ship=False)]))
    sku = uid("SKU")
    for loc, qty in ((ids["st"], 1), (ids["wh"], 10), (other, 3)):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=qty))

    out = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=3)], method=rp.FULFILMENT_METHOD_PICKUP,
        pickup_location_id=ids["st"], split_penalty=0.0)))
    by_loc = {s.location_id: s for s in out.plan.shipments}
    own = by_loc[ids["st"]]
    assert own.lines[0].quantity == 1 and own.ship_cost == 0.0 and own.distance_km == 0.0
    assert sum(s.lines[0].quantity for s in out.plan.shipments) == 3
    transfer = [s for s in out.plan.shipments if s.location_id != ids["st"]]
    assert transfer and all(s.ship_cost > 0 for s in transfer)
    cost = sum(s.ship_cost + s.unit_cost for s in out.plan.shipments)
    assert math.isclose(out.plan.total_cost, cost, rel_tol=1e-9)

    # without the warehouse, and `other` unable to send a transfer, P cannot be served: the answer
    # names the nearest pickup store that can serve the whole order from its own shelf
    short = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=3)], method=rp.FULFILMENT_METHOD_PICKUP,
        pickup_location_id=ids["st"], excluded_location_ids=[ids["wh"]])))
    assert not short.HasField("plan")
    assert other in short.suggested_pickup_location_ids

    await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=1)], method=rp.FULFILMENT_METHOD_PICKUP,
        pickup_location_id=uid("NOPE")))), grpc.StatusCode.NOT_FOUND)
