"""What the API says to a client: defaults it documents, error texts that name a field once and
state one rule for one kind of id, proto comments that tell the truth (StockLevel.version,
Reservation.lines), and a machine-readable reason on ALREADY_EXISTS."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from tests.conftest import make_world, store_location, uid
from tests.grpc_helpers import bad_fields, details, expect_error, shortfalls

Stub = api_grpc.InventoryServiceStub
PROTOS = Path(__file__).resolve().parents[1] / "protos" / "inventory" / "v1"
# ~1 degree of latitude is 111 km: stores at these offsets north of the search point
NEAR_KM, MID_KM, FAR_KM = 10.0, 40.0, 90.0


def violations(err: grpc.aio.AioRpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    out: list[error_details_pb2.BadRequest.FieldViolation] = []
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            msg = error_details_pb2.BadRequest()
            d.Unpack(msg)
            out += msg.field_violations
    return out


def assert_field_named_once(err: grpc.aio.AioRpcError) -> None:
    """Neither the description nor the status message says the field's name a second time."""
    text = err.details() or ""
    for v in violations(err):
        leaf = re.split(r"[.\[]", v.field)[-1]
        assert not v.description.startswith(f"{leaf}:"), (v.field, v.description)
        assert f"{leaf}: {leaf}:" not in text, text


async def test_find_nearby_without_radius_searches_50_km(stub: Stub) -> None:
    sku = uid("SKU")
    lat, lon = 50.06, 19.94
    ids = {km: uid("NB") for km in (NEAR_KM, MID_KM, FAR_KM)}
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(loc, lat=lat + km / 111.2, lon=lon) for km, loc in ids.items()]))
    for loc in ids.values():
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=3))
    item = api.SkuQuantity(sku=sku, quantity=1)
    got = await stub.FindNearby(api.FindNearbyRequest(items=[item], lat=lat, lon=lon))
    assert [x.location.id for x in got.locations] == [ids[NEAR_KM], ids[MID_KM]]
    wide = await stub.FindNearby(api.FindNearbyRequest(items=[item], lat=lat, lon=lon,
                                                       radius_km=100))
    assert [x.location.id for x in wide.locations] == [ids[NEAR_KM], ids[MID_KM], ids[FAR_KM]]
    err = await expect_error(stub.FindNearby(api.FindNearbyRequest(
        items=[item], lat=lat, lon=lon, radius_km=-1)), grpc.StatusCode.INVALID_ARGUMENT)
    (v,) = violations(err)
    assert v.field == "radius_km" and "default, 50 km" in v.description


async def test_routing_errors_name_the_field_once(channel: grpc.aio.Channel) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    line = rp.OrderLine(sku=uid("SKU"), quantity=1)
    for order, field in (
        (rp.RoutingOrder(lines=[line], dest_lat=91.0, dest_lon=21.0), "order.dest_lat"),
        (rp.RoutingOrder(lines=[line], dest_lat=52.0, dest_lon=21.0, max_shipments=999),
         "order.max_shipments"),
        (rp.RoutingOrder(lines=[line], dest_lat=52.0, dest_lon=21.0, split_penalty=-1.0),
         "order.split_penalty"),
    ):
        err = await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=order)),
                                 grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(err) == [field]
        assert_field_named_once(err)


async def test_a_location_id_has_one_rule_wherever_it_is_named(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    descriptions: dict[str, str] = {}
    for size in (100, 200):  # beyond 64 (the rule) and beyond 128 (the solver's own bound)
        bad = "P" * size
        err = await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
            lines=[rp.OrderLine(sku=uid("SKU"), quantity=1)],
            method=rp.FULFILMENT_METHOD_PICKUP, pickup_location_id=bad))),
            grpc.StatusCode.INVALID_ARGUMENT)
        (v,) = violations(err)
        assert v.field == "order.pickup_location_id"
        descriptions[f"pickup {size}"] = v.description
        err = await expect_error(stub.SetStock(api.SetStockRequest(
            sku=uid("SKU"), location_id=bad, on_hand=1)), grpc.StatusCode.INVALID_ARGUMENT)
        (v,) = violations(err)
        assert v.field == "location_id"
        descriptions[f"stock {size}"] = v.description
    # the same sentence, with the client's value quoted (by a short prefix) in it
    rules = {re.sub(r"'P+(?:'|…)", "ID", d) for d in descriptions.values()}
    assert rules == {"location id ID must be 1-64 characters of A-Za-z0-9_.-"}, descriptions
    assert "1-64 characters of [A-Za-z0-9_.-]" in (PROTOS / "common.proto").read_text()


def comment_above(proto: str, declaration: str) -> str:
    """The // comment lines right above a declaration (or on its line) in a .proto file."""
    lines = (PROTOS / proto).read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if x.strip().startswith(declaration))
    above: list[str] = []
    for x in reversed(lines[:at]):
        if not x.strip().startswith("//"):
            break
        above.insert(0, x.strip().removeprefix("//").strip())
    trailing = lines[at].split("//", 1)[1].strip() if "//" in lines[at] else ""
    return " ".join([*above, trailing]).strip()


async def test_version_moves_with_on_hand_and_safety_not_with_reservations(stub: Stub) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc = w.skus[0], w.locations[0]

    async def version() -> int:
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku], location_ids=[loc]))
        return got.items[0].levels[0].version

    v0 = await version()
    res = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=loc, quantity=2)]))).reservation
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=res.id))
    assert await version() == v0, "a reservation taken and released moved the version"
    # a compare-and-set on the version still applies after carts came and went
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=12,
                                            expected_version=v0))
    assert await version() == v0 + 1
    await stub.SetSafetyStock(api.SetSafetyStockRequest(sku=sku, location_id=loc, safety_stock=1))
    assert await version() == v0 + 2
    doc = comment_above("common.proto", "int64 version = 7;")
    assert "every change" not in doc and "Reservations" in doc and "leave it" in doc, doc


async def test_a_line_released_in_full_is_left_out_and_replays_stay_identical(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    w = await make_world(stub, locations=1, skus=2, on_hand=10)
    loc = w.locations[0]
    a, b = (pb.ReservationLine(sku=s, location_id=loc, quantity=q)
            for s, q in zip(w.skus, (3, 2), strict=True))
    res = (await stub.Reserve(api.ReserveRequest(lines=[a, b]))).reservation
    release = channel.unary_unary(  # raw bytes in and out: replays are compared byte for byte
        "/inventory.v1.InventoryService/ReleaseReservation",
        request_serializer=api.ReleaseReservationRequest.SerializeToString)
    request = api.ReleaseReservationRequest(reservation_id=res.id, lines=[a],
                                            idempotency_key=uid("rel"))
    first: bytes = await release(request)
    held = api.ReleaseReservationResponse.FromString(first).reservation
    assert held.status == pb.RESERVATION_STATUS_ACTIVE
    assert [(x.sku, x.quantity) for x in held.lines] == [(b.sku, 2)]
    assert await release(request) == first
    got = (await stub.GetReservation(api.GetReservationRequest(reservation_id=res.id))).reservation
    assert list(got.lines) == list(held.lines)
    # every line a client gets back may be sent back as it is
    done = (await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=res.id, lines=list(got.lines)))).reservation
    assert done.status == pb.RESERVATION_STATUS_RELEASED and list(done.lines) == []
    doc = comment_above("common.proto", "repeated ReservationLine lines = 5;")
    assert "left out" in doc and "still held" in doc, doc


async def test_already_exists_says_why_in_error_info(stub: Stub) -> None:
    w = await make_world(stub, locations=1, skus=1)
    key = uid("cart")
    line = pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0], quantity=1)
    await stub.Reserve(api.ReserveRequest(lines=[line], idempotency_key=key))
    other = pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0], quantity=2)
    err = await expect_error(stub.Reserve(api.ReserveRequest(lines=[other], idempotency_key=key)),
                             grpc.StatusCode.ALREADY_EXISTS)
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    infos = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            infos.append(info)
    assert [(x.reason, x.domain) for x in infos] == [("IDEMPOTENCY_KEY_REUSED", "inventory.v1")]
    assert key in (err.details() or "")


async def test_losers_of_one_row_hear_the_same_whole_answer_and_no_other_rows(stub: Stub) -> None:
    """A refusal for stock is built once for what it says (transport/errors.py keeps it): every
    loser of a sold-out row still gets the whole answer, and a kept answer never speaks for
    another row or another amount."""
    w = await make_world(stub, locations=2, skus=1, on_hand=1)
    sku, (here, there) = w.skus[0], w.locations

    def reserve(loc: str, qty: int) -> api.ReserveRequest:
        return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=loc,
                                                            quantity=qty)], ttl_seconds=60)

    answers = []
    for _ in range(3):
        err = await expect_error(stub.Reserve(reserve(here, 2)), grpc.StatusCode.FAILED_PRECONDITION)
        answers.append((err.details(), shortfalls(err), [type(d).__name__ for d in details(err)]))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][1] == [(sku, here, 2, 1)]
    assert answers[0][2] == ["PreconditionFailure", "InsufficientStock"]
    assert f"{sku}@{here}: requested 2, available 1" in answers[0][0]

    err = await expect_error(stub.Reserve(reserve(there, 3)), grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(sku, there, 3, 1)]
    await stub.Reserve(reserve(here, 1))  # the row's last unit: now it has none
    err = await expect_error(stub.Reserve(reserve(here, 2)), grpc.StatusCode.FAILED_PRECONDITION)
    assert shortfalls(err) == [(sku, here, 2, 0)]
