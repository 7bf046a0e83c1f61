"""Where a principal may act (DESIGN §8), over real gRPC: Sell only at active stores and, for a
store's terminals, only at their own; a scoped principal routes over its own locations only."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory_svc.server import Running, serve
from tests.conftest import Stores, settings_for, store_location, uid
from tests.grpc_helpers import details, expect_error
from tests.security.kit import Client

STORE1 = uid("STORE1")  # the pos terminal's store
OTHER = uid("STORE2")
WAREHOUSE = uid("WH")
CLOSED = uid("CLOSED")  # an inactive store
PREFIX = uid("REGION") + "-"  # a regional shop backend acts at the stores under this prefix
REGIONAL = [PREFIX + "A", PREFIX + "B"]
KEYS = f"k-pos:pos:{STORE1},k-shop:shop,k-region:shop:{PREFIX}*,k-admin:admin,k-erp:erp"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def svc(stores: Stores) -> AsyncIterator[Running]:
    async with serve(settings_for(stores, api_keys=KEYS)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ch(svc: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        erp = Client(channel, "k-erp")
        await erp.call(erp.inv.UpsertLocations, api.UpsertLocationsRequest(locations=[
            store_location(STORE1), store_location(OTHER, lat=52.24, lon=21.02),
            store_location(WAREHOUSE, type=pb.LOCATION_TYPE_WAREHOUSE, can_pickup=False),
            store_location(CLOSED, active=False),
            store_location(REGIONAL[0], lat=52.40, lon=16.90),
            store_location(REGIONAL[1], lat=52.41, lon=16.93)]))
        yield channel


async def _stocked(ch: grpc.aio.Channel, *locs: str, on_hand: int = 10) -> str:
    erp, sku = Client(ch, "k-erp"), uid("SKU")
    for loc in locs:
        await erp.call(erp.inv.SetStock, api.SetStockRequest(sku=sku, location_id=loc,
                                                            on_hand=on_hand))
    return sku


async def _levels(ch: grpc.aio.Channel, sku: str, *locs: str) -> list[tuple[int, int]]:
    erp = Client(ch, "k-erp")
    got = await erp.call(erp.inv.GetAvailability,
                         api.GetAvailabilityRequest(skus=[sku], location_ids=list(locs)))
    by_loc = {lv.location_id: (lv.on_hand, lv.reserved) for lv in got.items[0].levels}
    return [by_loc[x] for x in locs]


def _sell(loc: str, sku: str, qty: int = 1) -> api.SellRequest:
    return api.SellRequest(location_id=loc, items=[api.SkuQuantity(sku=sku, quantity=qty)])


def _precondition(err: grpc.aio.AioRpcError) -> list[str]:
    return [v.type for d in details(err) if isinstance(d, error_details_pb2.PreconditionFailure)
            for v in d.violations]


async def test_sell_is_refused_where_no_walk_in_customer_buys(ch: grpc.aio.Channel) -> None:
    admin = Client(ch, "k-admin")  # may sell anywhere: only the location's kind refuses it
    sku = await _stocked(ch, WAREHOUSE, CLOSED)
    err = await expect_error(admin.call(admin.inv.Sell, _sell(WAREHOUSE, sku)),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert _precondition(err) == ["NOT_A_STORE"] and "warehouse" in (err.details() or "")
    err = await expect_error(admin.call(admin.inv.Sell, _sell(CLOSED, sku)),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert _precondition(err) == ["LOCATION_INACTIVE"]
    assert await _levels(ch, sku, WAREHOUSE, CLOSED) == [(10, 0), (10, 0)], "a refusal sold"


async def test_a_terminal_sells_at_its_own_store_only(
        svc: Running, ch: grpc.aio.Channel) -> None:
    pos = Client(ch, "k-pos")
    sku = await _stocked(ch, STORE1, OTHER)
    err = await expect_error(pos.call(pos.inv.Sell, _sell(OTHER, sku)),
                             grpc.StatusCode.PERMISSION_DENIED)
    assert OTHER in (err.details() or "")
    # a location outside its scope is refused before its existence is told
    await expect_error(pos.call(pos.inv.Sell, _sell(uid("NOPE"), sku)),
                       grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(pos.call(pos.inv.Reserve, api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=OTHER, quantity=1)])),
        grpc.StatusCode.PERMISSION_DENIED)
    sold = await pos.call(pos.inv.Sell, _sell(STORE1, sku, 2))
    assert await _levels(ch, sku, STORE1, OTHER) == [(8, 0), (10, 0)]
    # the sale is the terminal's (principal names from keys: key-<sha256 prefix>)
    owner = await svc.ctx.pg.pool.fetchval(
        "SELECT owner FROM reservations WHERE id = $1", sold.reservation.id)
    assert owner == f"key-{hashlib.sha256(b'k-pos').hexdigest()[:12]}"


async def test_a_shop_may_not_act_for_the_pos_channel(ch: grpc.aio.Channel) -> None:
    shop = Client(ch, "k-shop")
    sku = await _stocked(ch, OTHER)
    err = await expect_error(shop.call(shop.inv.Reserve, api.ReserveRequest(
        lines=[pb.ReservationLine(sku=sku, location_id=OTHER, quantity=1)],
        channel=pb.CHANNEL_POS)), grpc.StatusCode.PERMISSION_DENIED)
    assert "POS" in (err.details() or "")
    await expect_error(shop.call(shop.inv.Sell, _sell(OTHER, sku)),
                       grpc.StatusCode.PERMISSION_DENIED)
    assert await _levels(ch, sku, OTHER) == [(10, 0)]


async def test_a_scoped_principal_routes_over_its_own_locations(ch: grpc.aio.Channel) -> None:
    region, shop = Client(ch, "k-region"), Client(ch, "k-shop")
    # cheapest from STORE1 / OTHER (next to the customer), but the region has its own stores
    sku = await _stocked(ch, STORE1, OTHER, *REGIONAL, on_hand=5)
    order = rp.RoutingOrder(lines=[rp.OrderLine(sku=sku, quantity=2)], dest_lat=52.23,
                            dest_lon=21.01)
    anyone = await shop.call(shop.routing.RouteOrder, rp.RouteOrderRequest(order=order))
    assert {s.location_id for s in anyone.plan.shipments} <= {STORE1, OTHER}
    mine = await region.call(region.routing.RouteOrder, rp.RouteOrderRequest(order=order))
    named = ({s.location_id for p in (mine.plan, *mine.alternatives) for s in p.shipments}
             | {x.location_id for x in mine.excluded})
    assert named and all(x.startswith(PREFIX) for x in named), named
    got = await region.call(region.routing.RouteAndReserve, rp.RouteAndReserveRequest(
        order=order))
    assert {x.location_id for x in got.reservation.lines} <= set(REGIONAL)

    # a pickup: only at a store of its own, and supplied only from its own
    pickup = rp.RoutingOrder(lines=[rp.OrderLine(sku=sku, quantity=2)],
                             method=rp.FULFILMENT_METHOD_PICKUP, pickup_location_id=STORE1)
    err = await expect_error(region.call(region.routing.RouteAndReserve,
                                         rp.RouteAndReserveRequest(order=pickup)),
                             grpc.StatusCode.PERMISSION_DENIED)
    assert "pickup location" in (err.details() or "")
    pos = Client(ch, "k-pos")
    only_own = rp.RoutingOrder(lines=[rp.OrderLine(sku=sku, quantity=6)],
                               method=rp.FULFILMENT_METHOD_PICKUP, pickup_location_id=STORE1)
    # 5 on its shelf, and it may not take the rest from OTHER next door
    await expect_error(pos.call(pos.routing.RouteAndReserve,
                                rp.RouteAndReserveRequest(order=only_own)),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert await _levels(ch, sku, STORE1, OTHER) == [(5, 0), (5, 0)]
