"""Stock writes, bulk import, transfers, reads and the ledger, over gRPC."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.app.stock import IMPORT_SLICE
from inventory_svc.server import Running
from tests.conftest import make_world, store_location, uid
from tests.grpc_helpers import bad_fields, details, expect_error, shortfalls
from tests.invariants import assert_invariants

# against the single server, and under --soak against a Redis Cluster too (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster(soak=True)

Stub = api_grpc.InventoryServiceStub


async def test_locations_upsert_list_and_validation(stub: Stub) -> None:
    wh, st = uid("WH"), uid("ST")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(wh, type=pb.LOCATION_TYPE_WAREHOUSE, can_pickup=False, daily_capacity=0),
        store_location(st, active=False)]))
    listed = await stub.ListLocations(api.ListLocationsRequest(ids=[wh, st], include_inactive=True))
    assert [x.id for x in listed.locations] == sorted([wh, st])
    only_active = await stub.ListLocations(api.ListLocationsRequest(ids=[wh, st]))
    assert [x.id for x in only_active.locations] == [wh]
    whs = await stub.ListLocations(api.ListLocationsRequest(ids=[wh, st], include_inactive=True,
                                                            type=pb.LOCATION_TYPE_STORE))
    assert [x.id for x in whs.locations] == [st]
    err = await expect_error(stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(uid("X"), lat=91.0, lon=float("nan"), fixed_cost=-1.0)])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert {"locations[0].lat", "locations[0].lon", "locations[0].fixed_cost"} <= set(
        bad_fields(err))
    err = await expect_error(stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(uid("X"), type=pb.LOCATION_TYPE_UNSPECIFIED)])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["locations[0].type"]


async def test_set_stock_compare_and_set(stub: Stub, service: Running) -> None:
    sku, loc = uid("SKU"), uid("L")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(loc)]))
    first = await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=7,
                                                    expected_version=0))
    assert (first.stock.on_hand, first.stock.version, first.delta) == (7, 1, 7)
    err = await expect_error(stub.SetStock(api.SetStockRequest(
        sku=sku, location_id=loc, on_hand=3, expected_version=0)), grpc.StatusCode.ABORTED)
    assert "version 1" in (err.details() or "")
    second = await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=4,
                                                     expected_version=1, reason="cycle count"))
    assert (second.stock.on_hand, second.stock.version, second.delta) == (4, 2, -3)
    ledger = await stub.ListMovements(api.ListMovementsRequest(sku=sku, location_id=loc))
    assert [(m.kind, m.delta, m.on_hand_after) for m in ledger.movements] == [
        (pb.MOVEMENT_KIND_COUNT, 7, 7), (pb.MOVEMENT_KIND_COUNT, -3, 4)]
    await expect_error(stub.SetStock(api.SetStockRequest(sku=sku, location_id=uid("NOPE"),
                                                         on_hand=1)), grpc.StatusCode.NOT_FOUND)
    await assert_invariants(service, [sku])


async def test_adjust_stock_reasons_and_reserved_floor(stub: Stub, service: Running) -> None:
    w = await make_world(stub, skus=1, locations=1, on_hand=5)
    sku, loc = w.skus[0], w.locations[0]
    got = await stub.AdjustStock(api.AdjustStockRequest(
        sku=sku, location_id=loc, delta=10, reason=api.ADJUSTMENT_REASON_RECEIPT, note="PO-9"))
    assert got.stock.on_hand == 15 and got.movement.kind == pb.MOVEMENT_KIND_RECEIPT
    await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=loc, quantity=12)]))
    err = await expect_error(stub.AdjustStock(api.AdjustStockRequest(
        sku=sku, location_id=loc, delta=-4, reason=api.ADJUSTMENT_REASON_DAMAGE)),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(sku, loc, 4, 3)]
    dmg = await stub.AdjustStock(api.AdjustStockRequest(
        sku=sku, location_id=loc, delta=-3, reason=api.ADJUSTMENT_REASON_DAMAGE, note="wet"))
    assert dmg.movement.kind == pb.MOVEMENT_KIND_ADJUSTMENT and dmg.movement.reason == "damage: wet"
    await expect_error(stub.AdjustStock(api.AdjustStockRequest(
        sku=sku, location_id=loc, delta=0, reason=api.ADJUSTMENT_REASON_OTHER)),
        grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(stub.AdjustStock(api.AdjustStockRequest(sku=sku, location_id=loc, delta=1)),
                       grpc.StatusCode.INVALID_ARGUMENT)
    err = await expect_error(stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc,
                                                               on_hand=11)),
                             grpc.StatusCode.FAILED_PRECONDITION)
    await assert_invariants(service, [sku])


async def test_transfer_writes_one_ledger_pair(stub: Stub, service: Running) -> None:
    w = await make_world(stub, skus=1, locations=2, on_hand=6)
    sku, a, b = w.skus[0], *w.locations
    out = await stub.TransferStock(api.TransferStockRequest(
        sku=sku, from_location_id=a, to_location_id=b, quantity=4, reason="rebalance"))
    assert (out.from_stock.on_hand, out.to_stock.on_hand) == (2, 10)
    assert [(m.location_id, m.kind, m.delta) for m in out.movements] == [
        (a, pb.MOVEMENT_KIND_TRANSFER_OUT, -4), (b, pb.MOVEMENT_KIND_TRANSFER_IN, 4)]
    await expect_error(stub.TransferStock(api.TransferStockRequest(
        sku=sku, from_location_id=a, to_location_id=b, quantity=3)),
        grpc.StatusCode.FAILED_PRECONDITION)
    err = await expect_error(stub.TransferStock(api.TransferStockRequest(
        sku=sku, from_location_id=a, to_location_id=a, quantity=1)),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["to_location_id"]
    await expect_error(stub.TransferStock(api.TransferStockRequest(
        sku=sku, from_location_id=a, to_location_id=uid("NOPE"), quantity=1)),
        grpc.StatusCode.NOT_FOUND)
    await assert_invariants(service, [sku])


async def test_safety_stock_per_sku_location_and_location_default(stub: Stub,
                                                                  service: Running) -> None:
    w = await make_world(stub, skus=2, locations=1, on_hand=10, safety=1)
    loc = w.locations[0]
    own = await stub.SetSafetyStock(api.SetSafetyStockRequest(sku=w.skus[0], location_id=loc,
                                                              safety_stock=4))
    assert (own.stock.safety_stock, own.stock.available) == (4, 6)
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(loc, default_safety_stock=3)]))
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus, location_ids=[loc]))
    assert [(i.levels[0].safety_stock, i.total_available) for i in out.items] == [(4, 6), (3, 7)]
    cleared = await stub.SetSafetyStock(api.SetSafetyStockRequest(sku=w.skus[0], location_id=loc))
    assert cleared.stock.safety_stock == 3
    await assert_invariants(service, w.skus)


async def test_availability_network_totals_and_channels(stub: Stub) -> None:
    w = await make_world(stub, skus=1, locations=3, on_hand=4, safety=1)
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus,
                                                                location_ids=w.locations))
    item = out.items[0]
    assert (item.total_on_hand, item.total_available, len(item.levels)) == (12, 9, 3)
    pos = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=w.skus, location_ids=w.locations, channel=pb.CHANNEL_POS))
    assert pos.items[0].total_available == 12
    unknown = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[uid("NEVER")]))
    assert list(unknown.items[0].levels) == [] and unknown.items[0].total_available == 0
    await expect_error(stub.GetAvailability(api.GetAvailabilityRequest(
        skus=w.skus, location_ids=[uid("NOPE")])), grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.GetAvailability(api.GetAvailabilityRequest(skus=[])),
                       grpc.StatusCode.INVALID_ARGUMENT)


async def test_find_nearby_nearest_first_with_enough_stock(stub: Stub) -> None:
    sku = uid("SKU")
    near, far, empty, outside = (uid("N"), uid("F"), uid("E"), uid("O"))
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(near, lat=52.23, lon=21.02), store_location(far, lat=52.40, lon=21.20),
        store_location(empty, lat=52.231, lon=21.011), store_location(outside, lat=50.0, lon=19.9)]))
    for loc, qty in ((near, 3), (far, 5), (empty, 1), (outside, 9)):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=qty))
    out = await stub.FindNearby(api.FindNearbyRequest(
        items=[api.SkuQuantity(sku=sku, quantity=2)], lat=52.2297, lon=21.0122, radius_km=50))
    assert [x.location.id for x in out.locations] == [near, far]
    assert out.locations[0].distance_km < out.locations[1].distance_km < 50
    assert out.locations[0].stock[0].available == 3
    err = await expect_error(stub.FindNearby(api.FindNearbyRequest(
        items=[api.SkuQuantity(sku=sku, quantity=1)], lat=float("inf"), lon=0, radius_km=5)),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "lat" in bad_fields(err)


async def test_an_import_refused_in_a_later_slice_changes_nothing_and_names_its_first_row(
    stub: Stub, service: Running,
) -> None:
    # An import is checked and written a slice at a time (in sku order) in one transaction.
    locs = [uid("IMP") for _ in range(2)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(x) for x in locs]))
    prefix = uid("SLICE")
    last = f"{prefix}-zzz"  # sorts after every other SKU of the load: the last slice
    await stub.SetStock(api.SetStockRequest(sku=last, location_id=locs[0], on_hand=10))
    await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=last, location_id=locs[0], quantity=8)]))
    rows = [api.ImportRow(sku=last, location_id=locs[0], on_hand=7)]  # row 0: below reserved
    rows += [api.ImportRow(sku=f"{prefix}-{i:06d}", location_id=locs[i % 2], on_hand=5)
             for i in range(3 * IMPORT_SLICE)]
    rows[5].location_id = uid("NOPE")  # row 5, in the first slice: no such location

    err = await expect_error(stub.ImportStock(iter([api.ImportStockRequest(
        rows=rows, reason="erp load")])), grpc.StatusCode.FAILED_PRECONDITION)
    assert "rows[0]" in (err.details() or ""), err.details()
    out = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[f"{prefix}-000000", last], location_ids=locs))
    assert [[lv.on_hand for lv in x.levels] for x in out.items] == [[], [10]]

    rows[5].location_id = locs[1]
    rows[0].on_hand = 9
    done = await stub.ImportStock(iter([api.ImportStockRequest(rows=rows, reason="erp load")]))
    assert (done.rows_received, done.rows_changed) == (len(rows), len(rows))
    await assert_invariants(service, [last, f"{prefix}-000000"])


async def test_import_stock_bulk_all_or_nothing(stub: Stub, service: Running) -> None:
    locs = [uid("IMP") for _ in range(4)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(x) for x in locs]))
    prefix = uid("BULK")
    n = 40_000  # four 10k-row messages, forty of the service's 1k-row slices

    def rows(bad_at: int | None = None):  # type: ignore[no-untyped-def]
        out = []
        for i in range(n):
            sku = f"{prefix}-{i // 4:06d}" if i != bad_at else ""
            out.append(api.ImportRow(sku=sku, location_id=locs[i % 4], on_hand=i % 50))
        return out

    async def stream(all_rows: list[api.ImportRow]):  # type: ignore[no-untyped-def]
        for i in range(0, len(all_rows), 10_000):
            yield api.ImportStockRequest(rows=all_rows[i:i + 10_000], reason="erp load")

    err = await expect_error(stub.ImportStock(stream(rows(bad_at=13_123))),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["rows[13123].sku"]
    first = f"{prefix}-000000"
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[first]))
    assert list(out.items[0].levels) == [], "a refused import committed something"

    done = await stub.ImportStock(stream(rows()))
    assert (done.rows_received, done.skus) == (n, n // 4)
    got = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[f"{prefix}-005678"], location_ids=locs))
    assert [lv.on_hand for lv in got.items[0].levels] == [
        (5678 * 4 + k) % 50 for k in sorted(range(4), key=lambda k: locs[k])]
    unknown = [api.ImportRow(sku=first, location_id=locs[0], on_hand=1),
               api.ImportRow(sku=first, location_id=uid("NOPE"), on_hand=1)]
    err = await expect_error(stub.ImportStock(stream(unknown)), grpc.StatusCode.NOT_FOUND)
    assert "rows[1]" in (err.details() or "")
    dup = [api.ImportRow(sku=first, location_id=locs[0], on_hand=1)] * 2
    err = await expect_error(stub.ImportStock(stream(dup)), grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["rows[1]"]
    # the reason goes into every ledger row: Postgres text holds no NUL (found by the fuzzer)
    nul = stub.ImportStock(iter([api.ImportStockRequest(
        rows=[api.ImportRow(sku=first, location_id=locs[0], on_hand=7)], reason="a\x00b")]))
    err = await expect_error(nul, grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["reason"]
    await assert_invariants(service, [first, f"{prefix}-012345"])


async def test_list_movements_pages(stub: Stub) -> None:
    w = await make_world(stub, skus=1, locations=1, on_hand=1)
    sku, loc = w.skus[0], w.locations[0]
    for _ in range(5):
        await stub.AdjustStock(api.AdjustStockRequest(
            sku=sku, location_id=loc, delta=1, reason=api.ADJUSTMENT_REASON_FOUND))
    seen, token = [], ""
    while True:
        page = await stub.ListMovements(api.ListMovementsRequest(
            sku=sku, location_id=loc, page_size=2, page_token=token))
        seen += [m.id for m in page.movements]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 6 and seen == sorted(seen)
    err = await expect_error(stub.ListMovements(api.ListMovementsRequest(
        sku=sku, location_id=loc, page_token="garbage")), grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["page_token"]
    err = await expect_error(stub.ListMovements(api.ListMovementsRequest()),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert details(err) and isinstance(details(err)[0], error_details_pb2.BadRequest)


async def test_a_read_again_follows_every_change_to_what_it_shows(
    stub: Stub, service: Running,
) -> None:
    # A SKU's built answer is kept while its Redis fields are unchanged (app/views.py): each
    # change below must show in the very next read, in the same channel and location scope.
    w = await make_world(stub, skus=1, locations=2, on_hand=5, safety=1)
    sku, (a, b) = w.skus[0], sorted(w.locations)
    by_loc = api.GetAvailabilityRequest(skus=[sku, sku], location_ids=[a, b])

    async def seen(request: api.GetAvailabilityRequest) -> list[tuple[str, int, int, int]]:
        out = await stub.GetAvailability(request)
        assert len(out.items) == 1 or out.items[0] == out.items[1]
        return [(lv.location_id, lv.on_hand, lv.reserved, lv.available)
                for lv in out.items[0].levels]

    assert await seen(by_loc) == await seen(by_loc) == [(a, 5, 0, 4), (b, 5, 0, 4)]
    await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=a, quantity=2)]))
    assert await seen(by_loc) == [(a, 5, 2, 2), (b, 5, 0, 4)]
    pos = api.GetAvailabilityRequest(skus=[sku], location_ids=[a, b], channel=pb.CHANNEL_POS)
    assert await seen(pos) == [(a, 5, 2, 3), (b, 5, 0, 5)]
    await stub.AdjustStock(api.AdjustStockRequest(sku=sku, location_id=b, delta=-1,
                                                  reason=api.ADJUSTMENT_REASON_DAMAGE))
    assert await seen(by_loc) == [(a, 5, 2, 2), (b, 4, 0, 3)]
    assert await seen(api.GetAvailabilityRequest(skus=[sku], location_ids=[b])) == [(b, 4, 0, 3)]
    # every active location, until one is switched off
    everywhere = api.GetAvailabilityRequest(skus=[sku])
    assert [x[0] for x in await seen(everywhere)] == [a, b]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(b, default_safety_stock=1, active=False)]))
    await service.ctx.refresh_locations()
    assert [x[0] for x in await seen(everywhere)] == [a]
    # Redis lost it all: hydrated again from Postgres, the same answer
    await service.ctx.redis.client.flushall()
    await service.reconciler.ensure_generation(startup=False)
    assert await seen(by_loc) == [(a, 5, 2, 2), (b, 4, 0, 3)]
