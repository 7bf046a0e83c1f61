"""Contention and idempotency over real gRPC (DESIGN I1, I2, I6)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, make_world, settings_for, uid
from tests.grpc_helpers import expect_error
from tests.invariants import assert_invariants

# against the single server, and under --soak against a Redis Cluster too (tests/conftest.py)
pytestmark = pytest.mark.redis_cluster(soak=True)

Stub = api_grpc.InventoryServiceStub
CLIENTS = 200
ROUNDS = 35


async def test_200_reservers_on_one_unit_exactly_one_wins_each_round(service: Running) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") for _ in range(8)]
    stubs = [api_grpc.InventoryServiceStub(c) for c in channels]
    w = await make_world(stubs[0], locations=1, skus=ROUNDS, on_hand=1)
    try:
        for sku in w.skus:
            async def reserve(i: int, sku: str = sku) -> grpc.StatusCode:
                try:
                    await stubs[i % len(stubs)].Reserve(api.ReserveRequest(lines=[
                        pb.ReservationLine(sku=sku, location_id=w.locations[0], quantity=1)]))
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    return err.code()

            codes = await asyncio.gather(*(reserve(i) for i in range(CLIENTS)))
            tally = Counter(c.name for c in codes)
            assert tally == {"OK": 1, "FAILED_PRECONDITION": CLIENTS - 1}, tally
    finally:
        for c in channels:
            await c.close()
    await assert_invariants(service, w.skus)


async def test_calls_beyond_the_redis_pool_wait_for_a_connection(stores: Stores) -> None:
    """A burst larger than the Redis connection pool waits for connections to come back: every
    call is answered as if the pool were large (redis-py's default pool raised
    MaxConnectionsError instead, answered UNAVAILABLE)."""
    async with serve(settings_for(stores, redis_pool_max=2)) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = api_grpc.InventoryServiceStub(channel)
        w = await make_world(stub, locations=2, skus=20, on_hand=100)

        async def call(i: int) -> str:
            sku, loc = w.skus[i % len(w.skus)], w.locations[i % 2]
            try:
                if i % 2:
                    await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
                else:
                    await stub.Reserve(api.ReserveRequest(lines=[
                        pb.ReservationLine(sku=sku, location_id=loc, quantity=1)]))
                return "OK"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        tally = Counter(await asyncio.gather(*(call(i) for i in range(200))))
        assert tally == {"OK": 200}, tally


async def keyed_reserve_of_3(stub: Stub, channel: grpc.aio.Channel, on_hand: int) -> Any:
    """A world of one SKU-location, a keyed Reserve of 3 units there, and the raw method (whose
    answers compare byte for byte)."""
    w = await make_world(stub, locations=1, skus=1, on_hand=on_hand)
    request = api.ReserveRequest(
        lines=[pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0], quantity=3)],
        idempotency_key=uid("idem"), order_ref="o-1")
    return w, request, channel.unary_unary("/inventory.v1.InventoryService/Reserve")


async def test_same_key_concurrently_and_in_sequence_has_one_effect(
    stub: Stub, service: Running, channel: grpc.aio.Channel,
) -> None:
    w, request, raw = await keyed_reserve_of_3(stub, channel, on_hand=100)

    async def call_until_answered() -> bytes:
        # ABORTED means "the first call with this key is still running": retry, as a client would
        for _ in range(200):
            try:
                return bytes(await raw(request.SerializeToString()))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, err
                await asyncio.sleep(0.01)
        raise AssertionError("never answered")

    concurrent = await asyncio.gather(*(call_until_answered() for _ in range(10)))
    sequential = [await call_until_answered() for _ in range(10)]
    assert len(set(concurrent + sequential)) == 1, "answers differ byte for byte"
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))
    assert out.items[0].levels[0].reserved == 3, "the key took effect more than once"

    other = api.ReserveRequest()
    other.CopyFrom(request)
    other.lines[0].quantity = 4
    err = await expect_error(stub.Reserve(other), grpc.StatusCode.ALREADY_EXISTS)
    assert request.idempotency_key in (err.details() or "")
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))
    assert out.items[0].levels[0].reserved == 3, "a refused repeat changed stock"
    await assert_invariants(service, w.skus)


async def test_every_mutation_is_idempotent(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=2, skus=1, on_hand=20)
    sku, a, b = w.skus[0], *w.locations
    calls = [
        (stub.SetStock, api.SetStockRequest(sku=sku, location_id=a, on_hand=25)),
        (stub.AdjustStock, api.AdjustStockRequest(sku=sku, location_id=a, delta=5,
                                                  reason=api.ADJUSTMENT_REASON_RECEIPT)),
        (stub.TransferStock, api.TransferStockRequest(sku=sku, from_location_id=a,
                                                      to_location_id=b, quantity=2)),
        (stub.Sell, api.SellRequest(location_id=b, items=[api.SkuQuantity(sku=sku, quantity=1)])),
        (stub.ReturnItems, api.ReturnItemsRequest(location_id=b, items=[
            api.SkuQuantity(sku=sku, quantity=1)], unmatched=True)),
        (stub.SetSafetyStock, api.SetSafetyStockRequest(sku=sku, location_id=a, safety_stock=2)),
    ]
    for method, request in calls:
        request.idempotency_key = uid("k")
        first = await method(request)
        again = await method(request)
        assert first == again, type(request).__name__
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku], location_ids=[a, b]))
    by_loc = {lv.location_id: lv.on_hand for lv in out.items[0].levels}
    assert by_loc == {a: 28, b: 22}
    res = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=a, quantity=2)]))).reservation
    for method, request in (
        (stub.ExtendReservation, api.ExtendReservationRequest(reservation_id=res.id,
                                                              ttl_seconds=120)),
        (stub.CommitReservation, api.CommitReservationRequest(reservation_id=res.id)),
    ):
        request.idempotency_key = uid("k")
        assert await method(request) == await method(request)
    await assert_invariants(service, [sku])


async def test_repeat_of_a_sold_out_reservation_gets_its_first_answer(
    stub: Stub, service: Running, channel: grpc.aio.Channel,
) -> None:
    # A keyed call that loses on stock in Redis never opens a transaction, so it must still
    # find its key's first answer: here the first call took the last units.
    w, request, raw = await keyed_reserve_of_3(stub, channel, on_hand=3)
    first = bytes(await raw(request.SerializeToString()))
    assert bytes(await raw(request.SerializeToString())) == first
    other = api.ReserveRequest()
    other.CopyFrom(request)
    other.lines[0].quantity = 1
    err = await expect_error(stub.Reserve(other), grpc.StatusCode.ALREADY_EXISTS)
    assert request.idempotency_key in (err.details() or "")
    fresh = api.ReserveRequest()
    fresh.CopyFrom(request)
    fresh.idempotency_key = uid("idem")
    await expect_error(stub.Reserve(fresh), grpc.StatusCode.FAILED_PRECONDITION)
    await assert_invariants(service, w.skus)
