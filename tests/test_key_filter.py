"""The key filter (storage/redis_keys.py): a keyed loser whose key never took stock is answered
from Redis alone, and a key that did take stock is still replayed, across a loss of Redis's data
(DESIGN I6). One Redis server: a cluster keeps no filter (every loser asks Postgres there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from prometheus_client import REGISTRY

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running, serve
from inventory_svc.storage import redis_keys
from inventory_svc.storage.redis_keys import KeyFilter
from tests.conftest import Stores, make_world, settings_for, uid
from tests.grpc_helpers import expect_error, shortfalls

Stub = api_grpc.InventoryServiceStub
# a hang guard: the fast keeper fills the filter hold_timeout_s (2 s) after it sees it missing
FILLED_WITHIN_S = 120


@pytest_asyncio.fixture(loop_scope="session")
async def keeper(stores: Stores) -> AsyncIterator[Running]:
    """A second replica on the same stores, whose holds time out after 2 s: its keeper fills
    the filter soon (the test service's waits 21 s). The calls go to the test service, whose
    generous timeouts suit a busy box; this one serves none."""
    async with serve(settings_for(stores, pg_timeout_s=1.0)) as running:
        yield running


async def filter_complete(svc: Running) -> None:
    """Poll (bounded) until a keeper has filled the filter."""
    for _ in range(int(FILLED_WITHIN_S / 0.05)):
        if (await redis_keys.filter_state(svc.ctx.redis.client))[1]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the key filter was not complete within {FILLED_WITHIN_S} s")


def filter_answers() -> float:
    """Keyed calls short of stock that the key filter answered, in this process so far."""
    return REGISTRY.get_sample_value("inventory_keyed_short_total", {"by": "key_filter"}) or 0.0


def reserve(sku: str, loc: str, qty: int, key: str) -> api.ReserveRequest:
    return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
                              idempotency_key=key, order_ref="o", ttl_seconds=600)


async def test_a_loser_whose_key_never_took_stock_does_not_ask_postgres(
        stub: Stub, service: Running, keeper: Running) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=3)
    sku, loc = w.skus[0], w.locations[0]
    await filter_complete(service)
    pg = service.ctx.pg
    winner = reserve(sku, loc, 3, uid("k"))
    first = await stub.Reserve(winner)
    before = pg.lookup_statements
    answered = filter_answers()
    losers = [reserve(sku, loc, 1, uid("k")) for _ in range(20)]
    for err in await asyncio.gather(*(expect_error(stub.Reserve(r),
                                                   grpc.StatusCode.FAILED_PRECONDITION)
                                      for r in losers)):
        assert shortfalls(err) == [(sku, loc, 1, 0)]
    assert pg.lookup_statements == before, "a loser with a new key asked Postgres"
    assert filter_answers() == answered + 20
    # the winner's key took stock: its repeat, short now, is the first answer
    assert await stub.Reserve(winner) == first
    assert pg.lookup_statements == before + 1
    # so is the repeat of a loser: it asks Postgres (its key is in the filter now), which
    # has no answer for it, and it is short again
    await expect_error(stub.Reserve(losers[0]), grpc.StatusCode.FAILED_PRECONDITION)


async def test_a_key_that_took_stock_is_replayed_after_redis_loses_its_data(
        stub: Stub, service: Running, keeper: Running) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=2)
    sku, loc = w.skus[0], w.locations[0]
    await filter_complete(service)
    winner = reserve(sku, loc, 2, uid("k"))
    first = await stub.Reserve(winner)
    await service.ctx.redis.client.flushall()  # the filter, its epoch and the stock: gone
    # not yet filled again: the repeat asks Postgres
    assert await stub.Reserve(winner) == first
    await filter_complete(service)
    # filled from Postgres: the winner's key is in it, so its repeat is still replayed
    # (a filter that had missed it would answer "short" here)
    assert await stub.Reserve(winner) == first
    pg = service.ctx.pg
    before = pg.lookup_statements
    await expect_error(stub.Reserve(reserve(sku, loc, 1, uid("k"))),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert pg.lookup_statements == before, "the filled filter was not trusted"


def test_a_key_is_looked_up_in_every_bucket_that_may_hold_it() -> None:
    shape = KeyFilter(bits=2**20, window_s=72 * 3600)
    took_at = 1_000_000.0
    written = shape.probe("p/k", took_at).buckets[0]
    # until its answer may be gone from Postgres (the window, and a bucket for late purges and
    # clocks), every later probe looks in the bucket it went to
    for later in range(0, int(shape.window_s + shape.bucket_s), 600):
        assert written in shape.probe("p/k", took_at + later).buckets
    # and the bucket lives as long
    assert shape.probe("p/k", took_at).expire_at_ms / 1000 >= \
        took_at + shape.window_s + shape.bucket_s
    # a replica whose clock is a bucket behind still looks where this one wrote
    assert written in shape.probe("p/k", took_at - shape.bucket_s).buckets
    assert len(set(shape.offsets("p/k"))) == len(shape.offsets("p/k")) == redis_keys.HASHES
