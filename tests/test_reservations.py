"""Reservation lifecycle over gRPC: every RPC's happy path and each error of DESIGN §4."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from tests.conftest import make_world, uid
from tests.grpc_helpers import bad_fields, details, expect_error, shortfalls
from tests.invariants import assert_invariants

# against the single server and against a Redis Cluster (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster

Stub = api_grpc.InventoryServiceStub


def line(sku: str, loc: str, qty: int) -> pb.ReservationLine:
    return pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)


async def availability(stub: Stub, sku: str, loc: str, channel: int = pb.CHANNEL_WEB) -> pb.StockLevel:
    out = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[sku], location_ids=[loc], channel=channel))
    (level,) = out.items[0].levels
    return level


async def test_reserve_multi_line_then_commit(stub: Stub, service: Running) -> None:
    w = await make_world(stub)
    res = (await stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], w.locations[0], 3), line(w.skus[1], w.locations[1], 2)],
        ttl_seconds=600, channel=pb.CHANNEL_APP, order_ref="ORD-1"))).reservation
    assert res.status == pb.RESERVATION_STATUS_ACTIVE
    assert res.channel == pb.CHANNEL_APP and res.order_ref == "ORD-1"
    assert 599_000 <= res.expires_at_unix_ms - res.created_at_unix_ms <= 601_000
    level = await availability(stub, w.skus[0], w.locations[0])
    assert (level.on_hand, level.reserved, level.available) == (10, 3, 7)

    got = (await stub.GetReservation(api.GetReservationRequest(reservation_id=res.id))).reservation
    assert got == res

    done = await stub.CommitReservation(api.CommitReservationRequest(reservation_id=res.id))
    assert done.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert sorted((m.sku, m.delta, m.kind) for m in done.movements) == sorted([
        (w.skus[0], -3, pb.MOVEMENT_KIND_SALE), (w.skus[1], -2, pb.MOVEMENT_KIND_SALE)])
    level = await availability(stub, w.skus[0], w.locations[0])
    assert (level.on_hand, level.reserved, level.available) == (7, 0, 7)
    await assert_invariants(service, w.skus)


async def test_reserve_is_all_or_nothing_with_shortfall_details(stub: Stub, service: Running) -> None:
    w = await make_world(stub, on_hand=5)
    err = await expect_error(stub.Reserve(api.ReserveRequest(lines=[
        line(w.skus[0], w.locations[0], 2), line(w.skus[1], w.locations[0], 6)])),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(w.skus[1], w.locations[0], 6, 5)]
    assert w.skus[1] in (err.details() or "")
    # nothing of the first line stayed held
    assert (await availability(stub, w.skus[0], w.locations[0])).reserved == 0
    await assert_invariants(service, w.skus)


async def test_safety_stock_is_kept_from_remote_channels_not_from_pos(stub: Stub) -> None:
    w = await make_world(stub, on_hand=5, safety=2)
    assert (await availability(stub, w.skus[0], w.locations[0])).available == 3
    assert (await availability(stub, w.skus[0], w.locations[0], pb.CHANNEL_POS)).available == 5
    err = await expect_error(stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], w.locations[0], 4)], channel=pb.CHANNEL_WEB)),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(w.skus[0], w.locations[0], 4, 3)]
    sale = await stub.Sell(api.SellRequest(location_id=w.locations[0], items=[
        api.SkuQuantity(sku=w.skus[0], quantity=5)]))
    assert sale.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert (await availability(stub, w.skus[0], w.locations[0], pb.CHANNEL_POS)).on_hand == 0


async def test_release_partial_then_whole(stub: Stub, service: Running) -> None:
    w = await make_world(stub)
    res = (await stub.Reserve(api.ReserveRequest(lines=[
        line(w.skus[0], w.locations[0], 4), line(w.skus[1], w.locations[0], 2)]))).reservation
    part = (await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=res.id, lines=[line(w.skus[0], w.locations[0], 3)]))).reservation
    assert part.status == pb.RESERVATION_STATUS_ACTIVE
    assert {(x.sku, x.quantity) for x in part.lines} == {(w.skus[0], 1), (w.skus[1], 2)}
    assert (await availability(stub, w.skus[0], w.locations[0])).reserved == 1
    err = await expect_error(stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=res.id, lines=[line(w.skus[0], w.locations[0], 2)])),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "holds 1" in (err.details() or "")
    whole = (await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=res.id))).reservation
    assert whole.status == pb.RESERVATION_STATUS_RELEASED and whole.ended_at_unix_ms > 0
    assert (await availability(stub, w.skus[1], w.locations[0])).reserved == 0
    # a terminal state is reached once: no commit, release or extend after it
    for call in (stub.CommitReservation(api.CommitReservationRequest(reservation_id=res.id)),
                 stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=res.id)),
                 stub.ExtendReservation(api.ExtendReservationRequest(reservation_id=res.id,
                                                                     ttl_seconds=60))):
        err = await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        (pf,) = [d for d in details(err) if isinstance(d, error_details_pb2.PreconditionFailure)]
        assert pf.violations[0].type == "RESERVATION_NOT_ACTIVE"
    await assert_invariants(service, w.skus)


async def test_extend_moves_expiry(stub: Stub) -> None:
    w = await make_world(stub)
    res = (await stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], w.locations[0], 1)], ttl_seconds=60))).reservation
    longer = (await stub.ExtendReservation(api.ExtendReservationRequest(
        reservation_id=res.id, ttl_seconds=3600))).reservation
    assert longer.expires_at_unix_ms - res.expires_at_unix_ms >= 3_500_000


async def test_return_items_restocks_any_location(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=2)
    res = (await stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], w.locations[0], 2)], order_ref="WEB-77"))).reservation
    await stub.CommitReservation(api.CommitReservationRequest(reservation_id=res.id))
    store = uid("RET")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[pb.Location(
        id=store, name="store", type=pb.LOCATION_TYPE_STORE, lat=50.06, lon=19.94, active=True)]))
    back = await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=store, items=[api.SkuQuantity(sku=w.skus[0], quantity=2)],
        order_ref="WEB-77", reason="customer return in store"))
    assert [(m.location_id, m.delta, m.kind) for m in back.movements] == [
        (store, 2, pb.MOVEMENT_KIND_RETURN)]
    assert back.stock[0].on_hand == 2
    ledger = await stub.ListMovements(api.ListMovementsRequest(order_ref="WEB-77"))
    assert [(m.kind, m.delta) for m in ledger.movements] == [
        (pb.MOVEMENT_KIND_SALE, -2), (pb.MOVEMENT_KIND_RETURN, 2)]
    await assert_invariants(service, w.skus)


async def test_errors_name_field_and_value(stub: Stub) -> None:
    w = await make_world(stub)
    cases = [
        (api.ReserveRequest(lines=[]), "lines"),
        (api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], 0)]), "lines[0].quantity"),
        (api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], -5)]), "lines[0].quantity"),
        (api.ReserveRequest(lines=[line("", w.locations[0], 1)]), "lines[0].sku"),
        (api.ReserveRequest(lines=[line("a b", w.locations[0], 1)]), "lines[0].sku"),
        (api.ReserveRequest(lines=[line(w.skus[0], "bad id!", 1)]), "lines[0].location_id"),
        (api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], 1)] * 2), "lines[1]"),
        (api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], 1)], ttl_seconds=10**7),
         "ttl_seconds"),
        (api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], 1)], idempotency_key="k" * 200),
         "idempotency_key"),
        (api.ReserveRequest(lines=[line("x" * 65, w.locations[0], 1)]), "lines[0].sku"),
    ]
    for request, field in cases:
        err = await expect_error(stub.Reserve(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in bad_fields(err), (request, bad_fields(err))
        assert field in (err.details() or "")
    # bad input changed nothing
    assert (await availability(stub, w.skus[0], w.locations[0])).reserved == 0


async def test_not_found_and_limits(stub: Stub, service: Running) -> None:
    w = await make_world(stub)
    err = await expect_error(stub.GetReservation(api.GetReservationRequest(
        reservation_id="r-does-not-exist")), grpc.StatusCode.NOT_FOUND)
    (info,) = [d for d in details(err) if isinstance(d, error_details_pb2.ResourceInfo)]
    assert info.resource_type == "reservation" and info.resource_name == "r-does-not-exist"
    await expect_error(stub.Reserve(api.ReserveRequest(
        lines=[line(uid("NOSKU"), w.locations[0], 1)])), grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], uid("NOLOC"), 1)])), grpc.StatusCode.NOT_FOUND)
    too_many = [line(f"{w.skus[0]}-{i}", w.locations[0], 1)
                for i in range(service.settings.max_lines + 1)]
    await expect_error(stub.Reserve(api.ReserveRequest(lines=too_many)),
                       grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_inactive_location_refuses_reservations(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1)
    from tests.conftest import store_location

    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(w.locations[0], active=False)]))
    err = await expect_error(stub.Reserve(api.ReserveRequest(
        lines=[line(w.skus[0], w.locations[0], 1)])), grpc.StatusCode.FAILED_PRECONDITION)
    (pf,) = [d for d in details(err) if isinstance(d, error_details_pb2.PreconditionFailure)]
    assert pf.violations[0].type == "LOCATION_INACTIVE"
    await assert_invariants(service, w.skus)
