"""The API contract at the trust boundary (issue 10), over real gRPC: a call whose deadline runs
out with its outcome unknown is DEADLINE_EXCEEDED (never UNAVAILABLE, which says "nothing was
confirmed"); bytes that do not decode are INVALID_ARGUMENT; huge values never make huge
trailers; a SHIP order needs its destination; an oversized message is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import grpc
import pytest
import pytest_asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, World, make_world, settings_for, uid
from tests.faults.harness import eventually, own_site, port_of, running, site_settings, with_port
from tests.faults.tcp_proxy import TcpProxy
from tests.grpc_helpers import bad_fields, details, expect_error
from tests.wire import delimited, varint

Stub = api_grpc.InventoryServiceStub
INVENTORY = "/inventory.v1.InventoryService/"
ROUTING = "/inventory.v1.RoutingService/"
SURROGATE = b"\xed\xa0\x80"  # U+D800 as CESU-8: no valid UTF-8 holds a lone surrogate


# ---- raw protobuf ---------------------------------------------------------------------------------
field = delimited


def raw_call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def line_bytes(sku: bytes, loc: bytes, quantity: int = 1) -> bytes:
    return field(1, sku) + field(2, loc) + varint(3 << 3 | 0) + varint(quantity)


async def reserved(stub: Stub, sku: str) -> list[int]:
    got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    return [lv.reserved for lv in got.items[0].levels]


# ---- (a) deadline ---------------------------------------------------------------------------------
async def test_deadline_with_outcome_unknown_is_deadline_exceeded_and_retry_finds_the_one(
        stores: Stores) -> None:
    latency_s, deadline_s = 0.4, 0.5  # one Postgres round trip alone outlasts the deadline
    async with own_site(stores) as site:
        with TcpProxy("127.0.0.1", port_of(site.database_url)) as proxy:
            settings = site_settings(stores, site,
                                     database_url=with_port(site.database_url, proxy.port))
            async with running(settings) as (svc, stub, _):
                w = await make_world(stub, locations=1, skus=1, on_hand=100)
                sku, loc = w.skus[0], w.locations[0]
                request = api.ReserveRequest(
                    lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=3)],
                    idempotency_key=uid("dl"), order_ref=uid("order"))
                await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))  # in Redis
                proxy.set_latency(upstream=latency_s, downstream=latency_s)
                # the service's own answer (just before the deadline) or the client's: never
                # UNAVAILABLE, which would tell the client that nothing was confirmed
                await expect_error(stub.Reserve(request, timeout=deadline_s),
                                   grpc.StatusCode.DEADLINE_EXCEEDED)
                # the outcome really was unknown: the reservation commits after the answer
                # (seen on a connection of our own, past the proxy)
                direct = await asyncpg.connect(site.database_url)
                try:
                    async def committed() -> bool:
                        return bool(await direct.fetchval(
                            "SELECT count(*) FROM reservations WHERE order_ref = $1",
                            request.order_ref))
                    await eventually(committed, within=30, what="the first call's commit")
                finally:
                    await direct.close()
                proxy.set_latency()
                answers: list[grpc.StatusCode] = []
                ids: list[str] = []

                async def settled() -> bool:
                    try:
                        out = await stub.Reserve(request, timeout=10)
                    except grpc.aio.AioRpcError as retry_err:
                        answers.append(retry_err.code())
                        assert retry_err.code() is grpc.StatusCode.ABORTED, retry_err
                        return False  # still in flight: retry, as the answer says
                    answers.append(grpc.StatusCode.OK)
                    ids.append(out.reservation.id)
                    return True
                await eventually(settled, within=30, what="a retry with the same key settles")
                rows = await svc.ctx.pg.pool.fetch(
                    "SELECT id, status FROM reservations WHERE order_ref = $1", request.order_ref)
                assert [(r["id"], r["status"]) for r in rows] == [(ids[0], "ACTIVE")], (rows, answers)
                level = await svc.ctx.pg.pool.fetchval(
                    "SELECT reserved FROM stock WHERE sku = $1 AND location_id = $2", sku, loc)
                assert level == 3
                # once more, now fast: the same answer
                again = await stub.Reserve(request, timeout=10)
                assert again.reservation.id == ids[0]


# ---- (b) undecodable bytes ------------------------------------------------------------------------
async def test_undecodable_bytes_are_invalid_argument_and_change_nothing(
        stub: Stub, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture) -> None:
    w = await make_world(stub, locations=1, skus=1)
    sku, loc = w.skus[0].encode(), w.locations[0].encode()
    valid = field(1, line_bytes(sku, loc)) + field(5, uid("k").encode())
    cases = {
        "Reserve": [
            valid + field(4, SURROGATE),  # order_ref: a lone surrogate
            field(1, line_bytes(sku + b"\xff", loc)),  # a line's sku: not UTF-8
            field(1, line_bytes(sku, loc)) + field(5, b"k-\xc3("),  # idempotency key
            valid[:-3],  # truncated: the last field is shorter than its length says
            b"\xff\xff\xff\xff",  # garbage: no valid tag
            bytes(range(256)),
        ],
        "GetReservation": [field(1, SURROGATE), field(1, b"\xc0\xaf"), b"\x0a\x05ab"],
        "SetStock": [field(1, sku) + field(2, loc[:-1] + b"\x80") + varint(3 << 3) + varint(99)],
        "ListLocations": [b"\x0a\xff\xff\xff\xff\x0f"],  # a length past the end
    }
    for method, bodies in cases.items():
        for body in bodies:
            err = await expect_error(raw_call(channel, INVENTORY + method)(body, timeout=10),
                                     grpc.StatusCode.INVALID_ARGUMENT)
            assert bad_fields(err) == ["request"], (method, body[:40], bad_fields(err))
    # a client-streaming call: a bad message in the stream refuses the whole load
    good_row = api.ImportStockRequest(rows=[api.ImportRow(
        sku=w.skus[0], location_id=w.locations[0], on_hand=999)]).SerializeToString()
    bad_row = field(1, field(1, SURROGATE) + field(2, loc) + varint(3 << 3) + varint(5))
    load = channel.stream_unary(INVENTORY + "ImportStock", request_serializer=None,
                                response_deserializer=None)
    await expect_error(load(iter([good_row, bad_row]), timeout=10),
                       grpc.StatusCode.INVALID_ARGUMENT)
    routed = field(1, field(1, field(1, sku + b"\xfe") + varint(2 << 3) + varint(1)))
    await expect_error(raw_call(channel, ROUTING + "RouteAndReserve")(routed, timeout=10),
                       grpc.StatusCode.INVALID_ARGUMENT)
    got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))
    assert [(lv.on_hand, lv.reserved) for lv in got.items[0].levels] == [(10, 0)]
    # and the same bytes, made valid, are served: it was the encoding that was refused
    await raw_call(channel, INVENTORY + "Reserve")(valid + field(4, b"ok"), timeout=10)
    assert await reserved(stub, w.skus[0]) == [1]
    # a client's bad bytes are no error of the service's: nothing logged as one
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ---- (c) huge values, small answers ---------------------------------------------------------------
def trailer_size(err: grpc.aio.AioRpcError) -> int:
    return sum(len(k) + len(v) for k, v in err.trailing_metadata() or ())


def quoted(err: grpc.aio.AioRpcError) -> str:
    """Everything the answer carries: the message and every trailer (details are binary)."""
    parts = [err.details() or ""]
    for _, v in err.trailing_metadata() or ():
        parts.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    return "\n".join(parts)


async def test_10kb_values_are_quoted_by_a_short_prefix_only(stub: Stub) -> None:
    w = await make_world(stub, locations=1, skus=1)
    big = {c: c * 10_000 for c in "QWZ"}
    loc, sku = w.locations[0], w.skus[0]
    line = pb.ReservationLine
    calls = [
        stub.GetReservation(api.GetReservationRequest(reservation_id=big["Q"])),
        stub.ExtendReservation(api.ExtendReservationRequest(reservation_id=big["Q"],
                                                            ttl_seconds=60)),
        stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=big["Q"])),
        stub.CommitReservation(api.CommitReservationRequest(reservation_id=big["Q"])),
        stub.SetStock(api.SetStockRequest(sku=big["W"], location_id=big["Z"], on_hand=1)),
        stub.Reserve(api.ReserveRequest(lines=[line(sku=sku, location_id=big["Z"], quantity=1),
                                               line(sku=big["W"], location_id=loc, quantity=1)],
                                        order_ref=big["Q"])),
        stub.Sell(api.SellRequest(location_id=big["Z"], items=[
            api.SkuQuantity(sku=big["W"], quantity=1)])),
        stub.GetAvailability(api.GetAvailabilityRequest(skus=[big["W"]], location_ids=[big["Z"]])),
        stub.ListMovements(api.ListMovementsRequest(sku=big["W"], page_token=big["Q"])),
    ]
    for call in calls:
        err = await refused(call)
        assert len(err.details() or "") < 1_000, err.details()
        assert trailer_size(err) < 2_048, (trailer_size(err), err.details())
        for c in "QWZ":
            assert c * 65 not in quoted(err), f"a long run of {c} quoted: {err.details()}"
    assert await reserved(stub, sku) == [0]


async def test_many_bad_values_still_make_an_answer_the_client_accepts(stub: Stub) -> None:
    """Clients drop trailers over 8 KB (the answer lost as RESOURCE_EXHAUSTED "Stream
    removed"): however many and however wide the bad values (4-byte characters travel
    percent-encoded, 12 bytes each), the refusal arrives whole, naming its first fields."""
    w = await make_world(stub, locations=1, skus=1)
    wide = "\U0001F984" * 65  # 65 unicorns: one too many for an id
    line = pb.ReservationLine
    calls = [
        stub.ListLocations(api.ListLocationsRequest(ids=["Z" * 10_000] * 50)),
        stub.GetAvailability(api.GetAvailabilityRequest(skus=[wide] * 1_000)),
        stub.Reserve(api.ReserveRequest(lines=[line(sku=wide, location_id=wide, quantity=-1)]
                                        * 200, order_ref=wide)),
        stub.Reserve(api.ReserveRequest(lines=[  # unknown, valid SKUs: 200 lines short
            line(sku="\U0001F984" * 61 + f"{i:03}", location_id=w.locations[0], quantity=1)
            for i in range(200)])),
        stub.ImportStock(iter([api.ImportStockRequest(rows=[
            api.ImportRow(sku=wide, location_id=wide, on_hand=-1)] * 1_000)])),
    ]
    for call in calls:
        err = await refused(call)
        assert trailer_size(err) < 6_144, (trailer_size(err), err.details())
        found = details(err)  # the rich status arrived and parses
        assert found, err.details()
        if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
            fields = bad_fields(err)
            assert fields and fields[0].split(".")[0].split("[")[0] in (
                "ids", "skus", "lines", "order_ref", "rows"), fields
    assert await reserved(stub, w.skus[0]) == [0]


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED), err
        return err
    raise AssertionError("a call with huge values succeeded")


# ---- (d) SHIP needs a destination -----------------------------------------------------------------
async def test_ship_order_needs_its_destination_and_zero_is_a_destination(
        stub: Stub, channel: grpc.aio.Channel) -> None:
    routing = rp_grpc.RoutingServiceStub(channel)
    w: World = await make_world(stub, locations=1, skus=1)
    lines = [rp.OrderLine(sku=w.skus[0], quantity=1)]
    for method in (rp.FULFILMENT_METHOD_UNSPECIFIED, rp.FULFILMENT_METHOD_SHIP):
        err = await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
            lines=lines, method=method))), grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(err) == ["order.dest_lat", "order.dest_lon"]
    err = await expect_error(routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=lines, dest_lat=52.0))), grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["order.dest_lon"]
    err = await expect_error(routing.RouteAndReserve(rp.RouteAndReserveRequest(
        order=rp.RoutingOrder(lines=lines, dest_lon=21.0), idempotency_key=uid("k"))),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["order.dest_lat"]
    assert await reserved(stub, w.skus[0]) == [0]
    # (0, 0) set explicitly is a place (in the Gulf of Guinea), not "no destination"
    got = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=lines, method=rp.FULFILMENT_METHOD_SHIP, dest_lat=0.0, dest_lon=0.0)))
    assert [s.location_id for s in got.plan.shipments] == w.locations
    assert got.plan.shipments[0].distance_km > 5_000
    done = await routing.RouteAndReserve(rp.RouteAndReserveRequest(order=rp.RoutingOrder(
        lines=lines, dest_lat=0.0, dest_lon=0.0), idempotency_key=uid("k")))
    assert done.reservation.id and await reserved(stub, w.skus[0]) == [1]
    # a pickup needs no destination
    got = await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=lines, method=rp.FULFILMENT_METHOD_PICKUP, pickup_location_id=w.locations[0])))
    assert [s.location_id for s in got.plan.shipments] == w.locations


# ---- (e) oversized messages -----------------------------------------------------------------------
async def test_message_over_the_default_4_mib_is_resource_exhausted(
        stub: Stub, channel: grpc.aio.Channel) -> None:
    get = raw_call(channel, INVENTORY + "GetReservation")
    await expect_error(get(field(1, b"r" * (5 * 1024 * 1024)), timeout=30),
                       grpc.StatusCode.RESOURCE_EXHAUSTED)
    # just under the limit it is read (and refused for what it says, not for its size)
    await expect_error(get(field(1, b"r" * (4 * 1024 * 1024 - 64)), timeout=30),
                       grpc.StatusCode.INVALID_ARGUMENT)


@pytest_asyncio.fixture(loop_scope="session")
async def small_limit_service(stores: Stores) -> AsyncIterator[Running]:
    async with serve(settings_for(stores, max_message_bytes=64 * 1024)) as svc:
        yield svc


async def test_configured_message_limit(small_limit_service: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_limit_service.port}") as ch:
        get = raw_call(ch, INVENTORY + "GetReservation")
        await expect_error(get(field(1, b"r" * 100_000), timeout=10),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        await expect_error(get(field(1, b"r" * 60_000), timeout=10),
                           grpc.StatusCode.INVALID_ARGUMENT)
        # the service still serves that connection
        await expect_error(get(field(1, b"r-unknown"), timeout=10), grpc.StatusCode.NOT_FOUND)


async def test_many_concurrent_refusals_leave_the_service_whole(
        stub: Stub, channel: grpc.aio.Channel) -> None:
    """Garbage in bulk: every call answered INVALID_ARGUMENT, none hangs, the service serves."""
    get = raw_call(channel, INVENTORY + "GetReservation")
    got = await asyncio.gather(*(get(b"\xff" * n, timeout=10) for n in range(1, 101)),
                               return_exceptions=True)
    codes = {x.code() if isinstance(x, grpc.aio.AioRpcError) else "OK" for x in got}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    await stub.ListLocations(api.ListLocationsRequest(ids=["nope"]))
