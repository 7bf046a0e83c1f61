"""API-key roles (UNAUTHENTICATED / PERMISSION_DENIED) and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, settings_for, store_location, uid
from tests.grpc_helpers import expect_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


METRICS_PORT = free_port()


@pytest_asyncio.fixture(loop_scope="session")
async def guarded_service(stores: Stores) -> AsyncIterator[Running]:
    settings = settings_for(stores, api_keys="k-shop:shop,k-erp:erp,k-pos:pos:L-*",
                            metrics_port=METRICS_PORT)
    async with serve(settings) as running:
        yield running


async def test_roles_and_missing_keys(guarded_service: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded_service.port}") as ch:
        stub = api_grpc.InventoryServiceStub(ch)
        loc, sku = uid("L"), uid("SKU")
        erp = (("x-api-key", "k-erp"),)
        shop = (("authorization", "Bearer k-shop"),)
        await expect_error(stub.ListLocations(api.ListLocationsRequest()),
                           grpc.StatusCode.UNAUTHENTICATED)
        await expect_error(stub.ListLocations(api.ListLocationsRequest(),
                                              metadata=(("x-api-key", "nope"),)),
                           grpc.StatusCode.UNAUTHENTICATED)
        await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(loc)]),
                                   metadata=erp)
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=3),
                            metadata=erp)
        err = await expect_error(stub.SetStock(api.SetStockRequest(
            sku=sku, location_id=loc, on_hand=99), metadata=shop),
            grpc.StatusCode.PERMISSION_DENIED)
        assert "shop" in (err.details() or "") and "SetStock" in (err.details() or "")
        line = pb.ReservationLine(sku=sku, location_id=loc, quantity=1)
        await stub.Reserve(api.ReserveRequest(lines=[line]), metadata=shop)
        await expect_error(stub.Sell(api.SellRequest(location_id=loc, items=[
            api.SkuQuantity(sku=sku, quantity=1)]), metadata=shop),
            grpc.StatusCode.PERMISSION_DENIED)
        await stub.Sell(api.SellRequest(location_id=loc, items=[
            api.SkuQuantity(sku=sku, quantity=1)]), metadata=(("x-api-key", "k-pos"),))
        await expect_error(stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=sku, location_id=loc, quantity=5)]), metadata=shop),
            grpc.StatusCode.FAILED_PRECONDITION)
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]), metadata=shop)
        assert got.items[0].total_on_hand == 2, "refused calls changed stock"
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(scrape)
    assert 'inventory_rpc_total{code="FAILED_PRECONDITION",method="Reserve"}' in text
    assert 'inventory_rpc_total{code="PERMISSION_DENIED",method="SetStock"}' in text
    assert 'inventory_rpc_seconds_bucket{le="0.02",method="Reserve"}' in text
