"""Returns that match what was sold (issue 10 §2): a return names its sale (a committed
reservation or an order_ref) and never brings back more than that sale sold; only erp/admin book
a return with no sale behind it; non-sellable returns never become available."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, World, make_world, settings_for, store_location, uid
from tests.grpc_helpers import bad_fields, details, expect_error
from tests.invariants import assert_invariants

Stub = api_grpc.InventoryServiceStub
SHOP = (("x-api-key", "k-shop"),)
ERP = (("x-api-key", "k-erp"),)


def q(sku: str, quantity: int) -> api.SkuQuantity:
    return api.SkuQuantity(sku=sku, quantity=quantity)


async def sell(stub: Stub, loc: str, lines: dict[str, int], order_ref: str = "",
               metadata: tuple[tuple[str, str], ...] = ()) -> api.SellResponse:
    return await stub.Sell(api.SellRequest(
        location_id=loc, items=[q(s, n) for s, n in lines.items()], order_ref=order_ref),
        metadata=metadata)


async def web_order(stub: Stub, lines: list[tuple[str, str, int]], order_ref: str
                    ) -> pb.Reservation:
    """An online order: reserved, then committed (sold)."""
    res = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=s, location_id=loc, quantity=n) for s, loc, n in lines],
        order_ref=order_ref, channel=pb.CHANNEL_WEB))).reservation
    await stub.CommitReservation(api.CommitReservationRequest(reservation_id=res.id))
    return res


async def levels(stub: Stub, sku: str, loc: str) -> tuple[int, int]:
    """(on_hand, available for WEB) of sku@loc; (0, 0) where it has no stock row."""
    out = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[sku], location_ids=[loc], channel=pb.CHANNEL_WEB))
    got = [(lv.on_hand, lv.available) for lv in out.items[0].levels]
    return got[0] if got else (0, 0)


async def ledger(stub: Stub, sku: str, loc: str) -> list[tuple[int, int]]:
    out = await stub.ListMovements(api.ListMovementsRequest(sku=sku, location_id=loc))
    return [(m.kind, m.delta) for m in out.movements]


async def returned(service: Running, column: str, ref: str) -> int:
    assert column in ("reservation_id", "order_ref")
    return int(await service.ctx.pg.pool.fetchval(
        f"SELECT COALESCE(sum(quantity), 0) FROM returns WHERE {column} = $1", ref))


def precondition(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    (pf,) = [d for d in details(err) if isinstance(d, error_details_pb2.PreconditionFailure)]
    return pf.violations[0].type, pf.violations[0].subject


async def snapshot(stub: Stub, w: World) -> list[object]:
    """Every level and ledger of the world: what a refused return must leave as it was."""
    out: list[object] = []
    for sku in w.skus:
        for loc in w.locations:
            out += [await levels(stub, sku, loc), await ledger(stub, sku, loc)]
    return out


async def test_return_without_a_sale_behind_it_is_refused(stub: Stub, service: Running) -> None:
    w = await make_world(stub, skus=2)
    sold, never = w.skus
    order = uid("ORD")
    await sell(stub, w.locations[0], {sold: 1}, order)
    before = await snapshot(stub, w)
    # the issue's case: 1e9 units of a SKU the order never sold
    err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=w.locations[0], items=[q(never, 1_000_000_000)], order_ref=order)),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert precondition(err) == ("RETURN_EXCEEDS_SALE", never)
    assert "returnable 0" in (err.details() or "")
    # a sale that does not exist
    err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=w.locations[0], items=[q(sold, 1_000_000_000)], order_ref=uid("NOSALE"))),
        grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=w.locations[0], items=[q(sold, 1)], reservation_id=uid("r"))),
        grpc.StatusCode.NOT_FOUND)
    # naming no sale at all (the old form of the call)
    err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=w.locations[0], items=[q(never, 1_000_000_000)])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert set(bad_fields(err)) == {"reservation_id", "order_ref", "unmatched"}
    assert await snapshot(stub, w) == before
    assert await returned(service, "order_ref", order) == 0
    await assert_invariants(service, w.skus)


async def test_return_of_more_than_was_sold_changes_nothing(stub: Stub, service: Running) -> None:
    w = await make_world(stub, skus=1)
    sku, loc = w.skus[0], w.locations[0]
    order = uid("ORD")
    sale = await sell(stub, loc, {sku: 1}, order)
    before = await snapshot(stub, w)
    for ref in ({"order_ref": order}, {"reservation_id": sale.reservation.id}):
        err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
            location_id=loc, items=[q(sku, 10)], **ref)), grpc.StatusCode.FAILED_PRECONDITION)
        assert precondition(err) == ("RETURN_EXCEEDS_SALE", sku)
        assert f"{sku}: requested 10, returnable 1" in (err.details() or "")
    assert await snapshot(stub, w) == before
    assert await levels(stub, sku, loc) == (9, 9)
    assert await returned(service, "order_ref", order) == 0
    out = await stub.ListMovements(api.ListMovementsRequest(order_ref=order))
    assert [m.kind for m in out.movements] == [pb.MOVEMENT_KIND_SALE]
    await assert_invariants(service, w.skus)


async def test_partial_returns_add_up_to_what_was_sold(stub: Stub, service: Running) -> None:
    w = await make_world(stub, skus=2)
    (a, b), loc = w.skus, w.locations[0]
    order = uid("ORD")
    res = await web_order(stub, [(a, loc, 3), (b, loc, 2)], order)
    first = await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=loc, items=[q(a, 1)], reservation_id=res.id))
    assert [(x.sku, x.quantity, x.sold, x.returnable) for x in first.lines] == [(a, 1, 3, 2)]
    assert first.return_id and first.reservation_id == res.id and first.order_ref == order
    assert first.disposition == api.RETURN_DISPOSITION_SELLABLE
    # by order_ref: the same sale, so the unit returned by reservation counts
    second = await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=loc, items=[q(a, 2), q(b, 2)], order_ref=order,
        disposition=api.RETURN_DISPOSITION_INSPECTION))
    assert [(x.sku, x.quantity, x.returnable) for x in second.lines] == [(a, 2, 0), (b, 2, 0)]
    assert second.return_id != first.return_id
    for ref in ({"order_ref": order}, {"reservation_id": res.id}):
        for sku in (a, b):
            err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
                location_id=loc, items=[q(sku, 1)], **ref)), grpc.StatusCode.FAILED_PRECONDITION)
            assert "returnable 0" in (err.details() or "")
    assert await returned(service, "order_ref", order) == 5
    assert await levels(stub, a, loc) == (8, 8)  # 10 - 3 sold + 1 sellable back
    assert await levels(stub, b, loc) == (8, 8)  # the inspected units are not on the shelf
    await assert_invariants(service, w.skus)


async def test_online_order_returned_in_a_store(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, warehouse = w.skus[0], w.locations[0]
    store = uid("STORE")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(store)]))
    order = uid("WEB")
    res = await web_order(stub, [(sku, warehouse, 2)], order)
    assert await levels(stub, sku, store) == (0, 0)
    back = await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=store, items=[q(sku, 2)], reservation_id=res.id,
        reason="customer return in store"))
    assert [(m.location_id, m.delta, m.kind, m.reservation_id, m.order_ref)
            for m in back.movements] == [(store, 2, pb.MOVEMENT_KIND_RETURN, res.id, order)]
    assert [(s.location_id, s.on_hand, s.available) for s in back.stock] == [(store, 2, 2)]
    assert await levels(stub, sku, store) == (2, 2)
    assert await levels(stub, sku, warehouse) == (8, 8)
    # the store can sell it again
    await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=store, quantity=2)]))
    out = await stub.ListMovements(api.ListMovementsRequest(reservation_id=res.id))
    assert [(m.kind, m.location_id, m.delta) for m in out.movements] == [
        (pb.MOVEMENT_KIND_SALE, warehouse, -2), (pb.MOVEMENT_KIND_RETURN, store, 2)]
    await assert_invariants(service, w.skus)


async def test_inspection_and_write_off_count_as_returned_not_available(
    stub: Stub, service: Running,
) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, loc = w.skus[0], w.locations[0]
    sale = await sell(stub, loc, {sku: 3})
    before = (await levels(stub, sku, loc), await ledger(stub, sku, loc))
    assert before[0] == (7, 7)
    for disposition, left in ((api.RETURN_DISPOSITION_INSPECTION, 2),
                              (api.RETURN_DISPOSITION_WRITE_OFF, 1)):
        out = await stub.ReturnItems(api.ReturnItemsRequest(
            location_id=loc, items=[q(sku, 1)], reservation_id=sale.reservation.id,
            disposition=disposition))
        assert (list(out.movements), list(out.stock)) == ([], [])
        assert out.disposition == disposition
        assert [(x.quantity, x.sold, x.returnable) for x in out.lines] == [(1, 3, left)]
        assert (await levels(stub, sku, loc), await ledger(stub, sku, loc)) == before
    err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=loc, items=[q(sku, 2)], reservation_id=sale.reservation.id)),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "returnable 1" in (err.details() or "")
    await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=loc, items=[q(sku, 1)], reservation_id=sale.reservation.id))
    assert await levels(stub, sku, loc) == (8, 8)
    assert await returned(service, "reservation_id", sale.reservation.id) == 3
    await assert_invariants(service, w.skus)


async def test_only_committed_reservations_are_returned(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, loc = w.skus[0], w.locations[0]
    line = pb.ReservationLine(sku=sku, location_id=loc, quantity=2)
    active = (await stub.Reserve(api.ReserveRequest(lines=[line]))).reservation
    released = (await stub.Reserve(api.ReserveRequest(lines=[line]))).reservation
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=released.id))
    for res in (active, released):
        err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
            location_id=loc, items=[q(sku, 1)], reservation_id=res.id)),
            grpc.StatusCode.FAILED_PRECONDITION)
        assert precondition(err) == ("RESERVATION_NOT_COMMITTED", res.id)
    assert await levels(stub, sku, loc) == (10, 8)
    await assert_invariants(service, w.skus)


async def test_concurrent_returns_never_exceed_the_sale(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=2, skus=1)
    sku, (shop, store) = w.skus[0], w.locations
    order = uid("ORD")
    sale = await sell(stub, shop, {sku: 3}, order)
    # by reservation and by its order at once: both draw on the same three units
    refs = [{"reservation_id": sale.reservation.id}, {"order_ref": order}] * 5
    answers = await asyncio.gather(*(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=store, items=[q(sku, 1)], **ref)) for ref in refs), return_exceptions=True)
    ok = [a for a in answers if isinstance(a, api.ReturnItemsResponse)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(ok) == 3 and len(refused) == 7, answers
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert sorted(x.lines[0].returnable for x in ok) == [0, 1, 2]
    assert await levels(stub, sku, store) == (13, 13)
    assert await returned(service, "order_ref", order) == 3
    await assert_invariants(service, w.skus)


async def test_repeat_gets_the_first_answer(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, loc = w.skus[0], w.locations[0]
    sale = await sell(stub, loc, {sku: 2})
    request = api.ReturnItemsRequest(location_id=loc, items=[q(sku, 1)],
                                     reservation_id=sale.reservation.id,
                                     idempotency_key=uid("k"))
    first = await stub.ReturnItems(request)
    again = await stub.ReturnItems(request)
    assert first == again and first.lines[0].returnable == 1
    assert await levels(stub, sku, loc) == (9, 9)
    assert await returned(service, "reservation_id", sale.reservation.id) == 1
    await assert_invariants(service, w.skus)


async def test_request_names_exactly_one_sale(stub: Stub) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, loc = w.skus[0], w.locations[0]
    sale = await sell(stub, loc, {sku: 1}, uid("ORD"))
    cases = [
        (dict(reservation_id=sale.reservation.id, order_ref=sale.reservation.order_ref),
         {"reservation_id", "order_ref"}),
        (dict(order_ref=sale.reservation.order_ref, unmatched=True), {"order_ref", "unmatched"}),
        (dict(reservation_id=sale.reservation.id, disposition=99), {"disposition"}),
        (dict(reservation_id="r" * 65), {"reservation_id"}),
    ]
    for fields, bad in cases:
        err = await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
            location_id=loc, items=[q(sku, 1)], **fields)),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert set(bad_fields(err)) == bad, fields
    await expect_error(stub.ReturnItems(api.ReturnItemsRequest(
        location_id=uid("NOWHERE"), items=[q(sku, 1)], reservation_id=sale.reservation.id)),
        grpc.StatusCode.NOT_FOUND)


# ---- who may return what --------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="session")
async def keyed(stores: Stores) -> AsyncIterator[Stub]:
    settings = settings_for(stores, api_keys="k-shop:shop,k-erp:erp,k-pos:pos:RSTORE-*")
    async with serve(settings) as running, grpc.aio.insecure_channel(
            f"127.0.0.1:{running.port}") as ch:
        yield api_grpc.InventoryServiceStub(ch)


async def test_only_erp_books_unmatched_returns(keyed: Stub) -> None:
    loc, sku = uid("L"), uid("SKU")
    await keyed.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(loc)]),
                                metadata=ERP)
    await keyed.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=5), metadata=ERP)
    unmatched = api.ReturnItemsRequest(location_id=loc, items=[q(sku, 1_000_000_000)],
                                       unmatched=True, reason="found in the back room")
    await expect_error(keyed.ReturnItems(unmatched, metadata=SHOP),
                       grpc.StatusCode.PERMISSION_DENIED)
    got = await keyed.GetAvailability(api.GetAvailabilityRequest(skus=[sku]), metadata=SHOP)
    assert got.items[0].total_on_hand == 5, "a refused return changed stock"
    unmatched.items[0].quantity = 2
    out = await keyed.ReturnItems(unmatched, metadata=ERP)
    assert [(m.delta, m.reason) for m in out.movements] == [
        (2, "unmatched return: found in the back room")]
    assert out.lines[0].sold == 0 and not out.reservation_id and not out.order_ref
    # a shop returns what was sold, as any principal may
    order = uid("ORD")
    res = (await keyed.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=loc, quantity=1)], order_ref=order),
        metadata=SHOP)).reservation
    await keyed.CommitReservation(api.CommitReservationRequest(reservation_id=res.id),
                                  metadata=SHOP)
    back = await keyed.ReturnItems(api.ReturnItemsRequest(
        location_id=loc, items=[q(sku, 1)], order_ref=order), metadata=SHOP)
    assert back.lines[0].returnable == 0


async def test_return_location_must_be_in_the_callers_scope(keyed: Stub) -> None:
    mine, other, sku = uid("RSTORE"), uid("L"), uid("SKU")
    await keyed.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(mine), store_location(other)]), metadata=ERP)
    for loc in (mine, other):
        await keyed.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=5),
                             metadata=ERP)
    pos = (("x-api-key", "k-pos"),)
    sale = await sell(keyed, mine, {sku: 2}, uid("ORD"), metadata=pos)
    await expect_error(keyed.ReturnItems(api.ReturnItemsRequest(
        location_id=other, items=[q(sku, 1)], reservation_id=sale.reservation.id),
        metadata=pos), grpc.StatusCode.PERMISSION_DENIED)
    await keyed.ReturnItems(api.ReturnItemsRequest(
        location_id=mine, items=[q(sku, 1)], reservation_id=sale.reservation.id), metadata=pos)
    got = await keyed.GetAvailability(api.GetAvailabilityRequest(
        skus=[sku], location_ids=[mine, other]), metadata=ERP)
    assert {lv.location_id: lv.on_hand for lv in got.items[0].levels} == {mine: 4, other: 5}
