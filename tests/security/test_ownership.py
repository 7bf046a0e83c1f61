"""Reservations belong to the principal that made them (DESIGN §8), over real gRPC: another
shop principal cannot see, extend, release or commit them, and is told NOT_FOUND exactly as for
an id that does not exist; erp sees and manages every principal's reservations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory_svc.server import Running, serve
from tests.conftest import Stores, settings_for, store_location, uid
from tests.grpc_helpers import details, expect_error
from tests.security.kit import Client


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def svc(stores: Stores) -> AsyncIterator[Running]:
    async with serve(settings_for(stores, api_keys="k-a:shop,k-b:shop,k-erp:erp")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ch(svc: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        yield channel


async def _stocked(erp: Client) -> tuple[str, str]:
    loc, sku = uid("ST"), uid("SKU")
    await erp.call(erp.inv.UpsertLocations,
                   api.UpsertLocationsRequest(locations=[store_location(loc)]))
    await erp.call(erp.inv.SetStock, api.SetStockRequest(sku=sku, location_id=loc, on_hand=10))
    return loc, sku


async def _reserved(erp: Client, owner: Client, qty: int = 3) -> tuple[str, str, pb.Reservation]:
    loc, sku = await _stocked(erp)
    got = await owner.call(owner.inv.Reserve, api.ReserveRequest(
        lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)], ttl_seconds=300))
    return loc, sku, got.reservation


def _not_found_view(err: grpc.aio.AioRpcError, res_id: str) -> tuple[object, ...]:
    """What a NOT_FOUND tells, with the id asked for taken out: it must not depend on whether
    the reservation exists."""
    return (err.code(), (err.details() or "").replace(res_id, "<id>"),
            tuple(str(d).replace(res_id, "<id>") for d in details(err)))


async def _refusals(b: Client, res_id: str) -> list[tuple[object, ...]]:
    """B's get / extend / release (whole and per line) / commit of `res_id`, as B sees them."""
    out = []
    for method, request in (
        (b.inv.GetReservation, api.GetReservationRequest(reservation_id=res_id)),
        (b.inv.ExtendReservation, api.ExtendReservationRequest(reservation_id=res_id,
                                                               ttl_seconds=600)),
        (b.inv.ReleaseReservation, api.ReleaseReservationRequest(reservation_id=res_id)),
        (b.inv.CommitReservation, api.CommitReservationRequest(reservation_id=res_id)),
    ):
        err = await expect_error(b.call(method, request), grpc.StatusCode.NOT_FOUND)
        out.append(_not_found_view(err, res_id))
    return out


async def test_another_shop_gets_not_found_exactly_as_for_an_unknown_id(
        ch: grpc.aio.Channel) -> None:
    a, b, erp = Client(ch, "k-a"), Client(ch, "k-b"), Client(ch, "k-erp")
    loc, sku, res = await _reserved(erp, a)

    seen_by_b = await _refusals(b, res.id)
    unknown = "r" + uuid.uuid4().hex[:len(res.id) - 1]
    assert seen_by_b == await _refusals(b, unknown), "B can tell A's reservation exists"
    # the same with idempotency keys: a keyed call of B changes nothing either
    await expect_error(b.call(b.inv.ReleaseReservation, api.ReleaseReservationRequest(
        reservation_id=res.id, idempotency_key=uid("k"))), grpc.StatusCode.NOT_FOUND)
    await expect_error(b.call(b.inv.ReleaseReservation, api.ReleaseReservationRequest(
        reservation_id=res.id, lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)])),
        grpc.StatusCode.NOT_FOUND)

    # A's reservation is as it was: still ACTIVE, same expiry, same lines, units still held
    now = (await a.call(a.inv.GetReservation,
                        api.GetReservationRequest(reservation_id=res.id))).reservation
    assert now == res
    level = (await a.call(a.inv.GetAvailability, api.GetAvailabilityRequest(
        skus=[sku], location_ids=[loc]))).items[0].levels[0]
    assert (level.on_hand, level.reserved) == (10, 3)

    # A itself extends and commits its own
    ext = await a.call(a.inv.ExtendReservation,
                       api.ExtendReservationRequest(reservation_id=res.id, ttl_seconds=600))
    assert ext.reservation.expires_at_unix_ms > res.expires_at_unix_ms
    done = await a.call(a.inv.CommitReservation,
                        api.CommitReservationRequest(reservation_id=res.id))
    assert done.reservation.status == pb.RESERVATION_STATUS_COMMITTED


async def test_erp_sees_and_releases_any_principals_reservation(ch: grpc.aio.Channel) -> None:
    a, erp = Client(ch, "k-a"), Client(ch, "k-erp")
    loc, sku, res = await _reserved(erp, a)
    seen = await erp.call(erp.inv.GetReservation,
                          api.GetReservationRequest(reservation_id=res.id))
    assert seen.reservation == res
    out = await erp.call(erp.inv.ReleaseReservation,
                         api.ReleaseReservationRequest(reservation_id=res.id))
    assert out.reservation.status == pb.RESERVATION_STATUS_RELEASED
    level = (await erp.call(erp.inv.GetAvailability, api.GetAvailabilityRequest(
        skus=[sku], location_ids=[loc]))).items[0].levels[0]
    assert level.reserved == 0
    # and A sees what erp did to it
    mine = await a.call(a.inv.GetReservation, api.GetReservationRequest(reservation_id=res.id))
    assert mine.reservation.status == pb.RESERVATION_STATUS_RELEASED


async def test_each_reservation_records_its_owner(svc: Running, ch: grpc.aio.Channel) -> None:
    """Reserve records its principal as the owner (Sell and RouteAndReserve: test_capacity,
    test_sell_scope)."""
    a, b, erp = Client(ch, "k-a"), Client(ch, "k-b"), Client(ch, "k-erp")
    _, _, res_a = await _reserved(erp, a, qty=1)
    _, _, res_b = await _reserved(erp, b, qty=1)
    owners = {r["id"]: r["owner"] for r in await svc.ctx.pg.pool.fetch(
        "SELECT id, owner FROM reservations WHERE id = ANY($1::text[])", [res_a.id, res_b.id])}
    assert owners[res_a.id] and owners[res_b.id] and owners[res_a.id] != owners[res_b.id]
