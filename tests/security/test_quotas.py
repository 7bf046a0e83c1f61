"""Per-principal quotas on holding stock (DESIGN §8: no client can hold capacity it is not
using), from a principals file, over real gRPC: max_ttl_s, max_extensions,
max_active_reservations, max_units_held."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory_svc.server import Running
from tests.conftest import Stores, store_location, uid
from tests.grpc_helpers import details, expect_error
from tests.security.kit import Client, Entry, service_with

LIMITS = {"max_active_reservations": 2, "max_units_held": 5, "max_ttl_s": 60,
          "max_extensions": 1, "calls_per_second": 0}
# one principal per test, so the tests do not count each other's reservations
SHOPS = ("ttl", "ext", "active", "units", "repeat", "routed")
ERP_KEY = "k-quota-erp"


def _key(shop: str) -> str:
    return f"k-quota-{shop}"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def svc(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    entries = [Entry(f"shop-{s}", "shop", _key(s), channels=["WEB"], quotas=dict(LIMITS))
               for s in SHOPS]
    entries += [Entry("shop-free", "shop", "k-quota-free", channels=["WEB"]),
                Entry("erp-q", "erp", ERP_KEY)]
    async with service_with(stores, tmp_path_factory.mktemp("quotas"), entries) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ch(svc: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        yield channel


async def _world(ch: grpc.aio.Channel, on_hand: int = 100) -> tuple[str, str]:
    erp = Client(ch, ERP_KEY)
    loc, sku = uid("ST"), uid("SKU")
    await erp.call(erp.inv.UpsertLocations,
                   api.UpsertLocationsRequest(locations=[store_location(loc, daily_capacity=0)]))
    await erp.call(erp.inv.SetStock, api.SetStockRequest(sku=sku, location_id=loc,
                                                        on_hand=on_hand))
    return loc, sku


def _reserve(loc: str, sku: str, qty: int, **kw: object) -> api.ReserveRequest:
    return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
                              **kw)  # type: ignore[arg-type]


def _quota_named(err: grpc.aio.AioRpcError) -> list[str]:
    return [v.subject for d in details(err) if isinstance(d, error_details_pb2.QuotaFailure)
            for v in d.violations]


async def _reserved_units(ch: grpc.aio.Channel, loc: str, sku: str) -> int:
    erp = Client(ch, ERP_KEY)
    out = await erp.call(erp.inv.GetAvailability,
                         api.GetAvailabilityRequest(skus=[sku], location_ids=[loc]))
    reserved: int = out.items[0].levels[0].reserved
    return reserved


async def test_ttl_above_max_ttl_is_refused_and_the_default_is_clamped(
        ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("ttl"))
    loc, sku = await _world(ch)
    err = await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 1, ttl_seconds=61)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_ttl_s"] and "max_ttl_s" in (err.details() or "")
    assert await _reserved_units(ch, loc, sku) == 0, "a refused call must hold nothing"
    # no ttl asked: the service default (900 s) clamped to the quota
    res = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))).reservation
    assert res.expires_at_unix_ms - res.created_at_unix_ms == 60_000
    res = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1, ttl_seconds=60))).reservation
    assert res.expires_at_unix_ms - res.created_at_unix_ms == 60_000
    # a principal without quotas keeps the service's bounds
    free = Client(ch, "k-quota-free")
    res = (await free.call(free.inv.Reserve, _reserve(loc, sku, 1, ttl_seconds=600))).reservation
    assert res.expires_at_unix_ms - res.created_at_unix_ms == 600_000


async def test_extensions_are_counted_per_reservation(ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("ext"))
    loc, sku = await _world(ch)
    res = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1, ttl_seconds=30))).reservation
    err = await expect_error(shop.call(shop.inv.ExtendReservation, api.ExtendReservationRequest(
        reservation_id=res.id, ttl_seconds=61)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_ttl_s"]
    once = (await shop.call(shop.inv.ExtendReservation, api.ExtendReservationRequest(
        reservation_id=res.id, ttl_seconds=60))).reservation
    err = await expect_error(shop.call(shop.inv.ExtendReservation, api.ExtendReservationRequest(
        reservation_id=res.id, ttl_seconds=60)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_extensions"]
    now = (await shop.call(shop.inv.GetReservation,
                           api.GetReservationRequest(reservation_id=res.id))).reservation
    assert now.expires_at_unix_ms == once.expires_at_unix_ms, "a refused extension changed it"
    # the count belongs to the reservation: another one may be extended once too
    other = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))).reservation
    await shop.call(shop.inv.ExtendReservation,
                    api.ExtendReservationRequest(reservation_id=other.id, ttl_seconds=60))


async def test_active_reservations_are_capped_until_one_ends(ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("active"))
    loc, sku = await _world(ch)
    first = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))).reservation
    second = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))).reservation
    err = await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 1)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_active_reservations"]
    assert "max_active_reservations" in (err.details() or "")
    assert await _reserved_units(ch, loc, sku) == 2, "the refused call took a hold"
    # a released reservation is no longer active, nor a committed one
    await shop.call(shop.inv.ReleaseReservation,
                    api.ReleaseReservationRequest(reservation_id=first.id))
    await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))
    await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 1)),
                       grpc.StatusCode.RESOURCE_EXHAUSTED)
    await shop.call(shop.inv.CommitReservation,
                    api.CommitReservationRequest(reservation_id=second.id))
    await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))


async def test_units_held_are_capped(ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("units"))
    loc, sku = await _world(ch)
    err = await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 6)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_units_held"]
    first = (await shop.call(shop.inv.Reserve, _reserve(loc, sku, 4))).reservation
    err = await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 2)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_units_held"]
    assert await _reserved_units(ch, loc, sku) == 4
    # a partial release frees units for the next one
    await shop.call(shop.inv.ReleaseReservation, api.ReleaseReservationRequest(
        reservation_id=first.id, lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)]))
    await shop.call(shop.inv.Reserve, _reserve(loc, sku, 2))


async def test_a_repeat_of_the_call_that_reached_the_quota_gets_its_answer(
        ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("repeat"))
    loc, sku = await _world(ch)
    await shop.call(shop.inv.Reserve, _reserve(loc, sku, 1))
    keyed = _reserve(loc, sku, 1, idempotency_key=uid("k"))
    raw = ch.unary_unary("/inventory.v1.InventoryService/Reserve")
    first = await raw(keyed.SerializeToString(), metadata=shop.meta)
    # at the limit now; the repeat (a client that lost the answer) is answered, not refused
    assert await raw(keyed.SerializeToString(), metadata=shop.meta) == first
    await expect_error(shop.call(shop.inv.Reserve, _reserve(loc, sku, 1)),
                       grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_route_and_reserve_is_held_to_the_same_quotas(ch: grpc.aio.Channel) -> None:
    shop = Client(ch, _key("routed"))
    loc, sku = await _world(ch)

    def order(qty: int, **kw: object) -> rp.RouteAndReserveRequest:
        return rp.RouteAndReserveRequest(order=rp.RoutingOrder(
            lines=[rp.OrderLine(sku=sku, quantity=qty)], method=rp.FULFILMENT_METHOD_PICKUP,
            pickup_location_id=loc), **kw)  # type: ignore[arg-type]

    err = await expect_error(shop.call(shop.routing.RouteAndReserve, order(1, ttl_seconds=61)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_ttl_s"]
    err = await expect_error(shop.call(shop.routing.RouteAndReserve, order(6)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_units_held"]
    got = await shop.call(shop.routing.RouteAndReserve, order(3))
    res = got.reservation
    assert res.expires_at_unix_ms - res.created_at_unix_ms == 60_000
    await shop.call(shop.routing.RouteAndReserve, order(2))
    err = await expect_error(shop.call(shop.routing.RouteAndReserve, order(1)),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _quota_named(err) == ["max_active_reservations"]
    assert await _reserved_units(ch, loc, sku) == 5

