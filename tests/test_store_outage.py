"""A store that goes away: clients get UNAVAILABLE (never INTERNAL), nothing half-done stays."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.embedded import EmbeddedRedis
from inventory_svc.server import Running, serve
from tests.conftest import Stores, make_world, settings_for
from tests.grpc_helpers import details, expect_error
from tests.invariants import assert_invariants


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis_service(stores: Stores) -> AsyncIterator[tuple[Running, EmbeddedRedis]]:
    root = Path(tempfile.mkdtemp(prefix="inventory-test-outage-"))
    redis = EmbeddedRedis(root, durable=False)
    try:
        url = redis.start()
        async with serve(settings_for(stores, redis_url=url, redis_timeout_s=0.5)) as running:
            yield running, redis
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_redis_down_gives_unavailable_then_recovers(
    own_redis_service: tuple[Running, EmbeddedRedis],
) -> None:
    service, redis = own_redis_service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = api_grpc.InventoryServiceStub(ch)
        w = await make_world(stub, locations=1, skus=1, on_hand=5)
        line = pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0], quantity=2)
        redis.kill()
        for call in (stub.Reserve(api.ReserveRequest(lines=[line])),
                     stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))):
            err = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details(err))
        # a write that Postgres commits is acknowledged even while Redis is down (I5) ...
        await stub.AdjustStock(api.AdjustStockRequest(
            sku=w.skus[0], location_id=w.locations[0], delta=1,
            reason=api.ADJUSTMENT_REASON_RECEIPT))
        redis.restart()  # ... and Redis comes back empty: rebuilt from Postgres
        await service.reconciler.run_pass()
        res = await stub.Reserve(api.ReserveRequest(lines=[line]))
        assert res.reservation.status == pb.RESERVATION_STATUS_ACTIVE
        out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))
        assert (out.items[0].total_on_hand, out.items[0].total_available) == (6, 4)
        await assert_invariants(service, w.skus)
