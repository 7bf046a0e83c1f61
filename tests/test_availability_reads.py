"""Availability reads (storage/redis_reads.py): a process keeps the whole hashes it read and reads
one again only when its change count moved, and a read of some locations reads only those. Every
change must still show in the next read, and reads of one moment agree."""

from __future__ import annotations

import asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from inventory_svc.storage.redis_layout import stock_key
from inventory_svc.storage.redis_reads import HashReader
from tests.conftest import make_world, uid

Stub = api_grpc.InventoryServiceStub


async def levels(stub: Stub, sku: str, *locations: str) -> dict[str, tuple[int, int]]:
    out = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[sku], location_ids=list(locations)))
    return {lv.location_id: (lv.on_hand, lv.reserved) for lv in out.items[0].levels}


async def test_every_change_shows_in_the_next_read(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=3, skus=1, on_hand=10)
    sku, (a, b, c) = w.skus[0], w.locations
    assert await levels(stub, sku) == {a: (10, 0), b: (10, 0), c: (10, 0)}
    assert await levels(stub, sku) == {a: (10, 0), b: (10, 0), c: (10, 0)}  # kept

    held = await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=a, quantity=4)]))
    assert (await levels(stub, sku))[a] == (10, 4), "a reservation did not show"
    await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=held.reservation.id))
    assert (await levels(stub, sku))[a] == (10, 0), "a release did not show"
    sold = await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=b, quantity=3)]))
    await stub.CommitReservation(api.CommitReservationRequest(
        reservation_id=sold.reservation.id))
    assert (await levels(stub, sku))[b] == (7, 0), "a sale did not show"
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=c, on_hand=2))
    assert (await levels(stub, sku))[c] == (2, 0), "a count did not show"

    # some locations: those only, as current as a whole read
    assert await levels(stub, sku, c, a) == {a: (10, 0), c: (2, 0)}

    # Redis lost and rebuilt (on demand): the kept copy is not served
    await service.ctx.redis.client.flushall()
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=a, on_hand=1))
    assert await levels(stub, sku) == {a: (1, 0), b: (7, 0), c: (2, 0)}


async def test_one_answer_holds_kept_and_new_items_in_the_order_asked(stub: Stub) -> None:
    """The service keeps each SKU's answer while its stock is unchanged and sends kept answers
    as they were encoded: a response that mixes kept items with new ones (and a SKU asked twice)
    still has every item, current, in the order of the request."""
    w = await make_world(stub, locations=2, skus=2, on_hand=10)
    (x, y), (a, b) = w.skus, sorted(w.locations)
    await stub.GetAvailability(api.GetAvailabilityRequest(skus=[x, y]))  # both kept now
    await stub.SetStock(api.SetStockRequest(sku=y, location_id=b, on_hand=3))
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[y, x, y]))
    assert [(i.sku, i.total_on_hand, [(lv.location_id, lv.on_hand) for lv in i.levels])
            for i in out.items] == [(y, 13, [(a, 10), (b, 3)]), (x, 20, [(a, 10), (b, 10)]),
                                    (y, 13, [(a, 10), (b, 3)])]
    pos = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=[x], location_ids=[b], channel=pb.CHANNEL_POS))
    assert [(i.sku, i.total_on_hand, len(i.levels)) for i in pos.items] == [(x, 10, 1)]


async def test_reads_of_one_moment_agree(stub: Stub) -> None:
    w = await make_world(stub, locations=2, skus=3, on_hand=5)
    calls = [levels(stub, sku, *loc) for sku in w.skus for loc in ((), (w.locations[1],))] * 5
    answers = await asyncio.gather(*calls)
    for got, call in zip(answers, range(len(calls)), strict=True):
        wanted = {x: (5, 0) for x in (w.locations if call % 2 == 0 else w.locations[1:])}
        assert got == wanted


async def test_a_hash_dropped_by_one_read_while_another_waits_fails_neither(
        service: Running) -> None:
    # Reads of successive loop turns run at once (one pipeline each). A read that finds a kept
    # hash no longer hydrated drops it from the kept hashes; a read that counted it as kept
    # before its own round trip, and is still waiting for a wide hash's reply, must still
    # answer (it raised KeyError, so INTERNAL to every caller of its turn).
    client = service.ctx.redis.client
    reader = HashReader(client)
    key, wide = stock_key(uid("SKU")), stock_key(uid("WIDE"))
    # too wide to be kept: read whole every time, and slow to parse
    await client.hset(wide, mapping={"_": "1", **{f"L{i}": "1:0:0:1:1:0" for i in range(60_000)}})
    try:
        for _ in range(10):
            await client.hset(key, mapping={"_": "1", "L1": "1:0:0:1:1:0"})
            await reader.read([key])  # kept
            slow = asyncio.ensure_future(reader.read([key, wide]))  # counts `key` as kept
            for _ in range(3):  # its pipeline is on its way
                await asyncio.sleep(0)
            await client.hdel(key, "_")  # unhydrated: the next read drops it from the kept
            assert await reader.read([key]) == [{b"L1": b"1:0:0:1:1:0"}]
            got = await slow
            assert len(got[1]) == 60_001
    finally:
        await client.delete(key, wide)
