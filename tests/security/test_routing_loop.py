"""A long routing solve runs in a worker thread, at most `routing_concurrency` at once: one
client's 200-line RouteOrder cannot stall every other call of the replica (DESIGN §8)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.server import Running
from tests.conftest import store_location, uid

Stub = api_grpc.InventoryServiceStub
LOCATIONS, LINES = 45, 200  # about half a second of OPTIMAL search with up to 6 shipments


async def _big_order(stub: Stub) -> rp.RouteOrderRequest:
    """45 stores each holding some of 200 SKUs: an order of all 200 has many 6-store plans."""
    rng = random.Random(7)
    tag = uid("BIG")
    locs = [f"{tag}-{i:02d}" for i in range(LOCATIONS)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(x, lat=52 + rng.random(), lon=21 + rng.random(),
                       priority=rng.randint(1, 100), fixed_cost=10 + 10 * rng.random(),
                       cost_per_km=0.05, cost_per_unit=1 + rng.random(), daily_capacity=0)
        for x in locs]))
    skus = [f"{tag}-SKU-{j:03d}" for j in range(LINES)]

    async def rows() -> AsyncIterator[api.ImportStockRequest]:
        yield api.ImportStockRequest(rows=[
            api.ImportRow(sku=s, location_id=x, on_hand=rng.choice((0, 1, 2, 3, 5)))
            for x in locs for s in skus if rng.random() < 0.7])

    await stub.ImportStock(rows())
    return rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=s, quantity=3) for s in skus], dest_lat=52.5, dest_lon=21.5,
        max_shipments=6, split_penalty=5.0, alternatives=3))


async def test_other_calls_are_answered_while_a_big_order_is_solved(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    request = await _big_order(stub)
    probe = api.GetAvailabilityRequest(skus=[request.order.lines[0].sku])
    done: list[str] = []  # completion order

    async def route() -> rp.RouteOrderResponse:
        out = await routing.RouteOrder(request)
        done.append("route")
        return out

    big = asyncio.create_task(route())
    concurrency = service.settings.routing_concurrency
    for _ in range(100_000):  # bounded by the solve: the loop ends when the route does
        if big.done():
            break
        solving = service.routing.solving
        assert solving <= concurrency
        await stub.GetAvailability(probe)
        # answered entirely while the solve ran: it started before and had not ended after
        if solving and service.routing.solving and not big.done():
            done.append("availability")
            break
    result = await big
    assert result.HasField("plan") and len(result.plan.shipments) <= 6
    assert done == ["availability", "route"], "GetAvailability waited for the solve"


async def test_solves_at_once_are_bounded(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    request = await _big_order(stub)
    probe = api.GetAvailabilityRequest(skus=[request.order.lines[0].sku])
    calls = [asyncio.ensure_future(routing.RouteOrder(request)) for _ in range(3)]
    seen: set[int] = set()
    for _ in range(100_000):  # bounded by the solves
        if all(c.done() for c in calls):
            break
        seen.add(service.routing.solving)
        await stub.GetAvailability(probe)
    plans = [(await c).plan for c in calls]
    assert plans[0] == plans[1] == plans[2]
    assert max(seen) <= service.settings.routing_concurrency, seen
    assert service.routing.solving == 0
