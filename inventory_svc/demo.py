"""Load the demo network (real Polish cities) into a running service over its own gRPC API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.demo_data import DemoNetwork, build_demo
from inventory_svc.transport.convert import location_out

log = logging.getLogger(__name__)
ROWS_PER_MESSAGE = 5_000


async def load_demo(target: str, *, seed: int = 7, sku_count: int = 10_000,
                    api_key: str = "") -> DemoNetwork:
    """Upsert the demo locations and import their stock; safe to run again (absolute counts).
    Over plaintext gRPC: a service with principals needs an erp or admin `api_key`."""
    demo = build_demo(seed, sku_count=sku_count)
    log.info("loading the demo network: %d locations, %d SKUs, %d stock rows (one transaction)",
             len(demo.locations), sku_count, len(demo.stock))
    meta = (("x-api-key", api_key),) if api_key else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_grpc.InventoryServiceStub(channel)
        await stub.UpsertLocations(api.UpsertLocationsRequest(
            locations=[location_out(x) for x in demo.locations]), metadata=meta)

        async def batches() -> AsyncIterator[api.ImportStockRequest]:
            rows = demo.stock
            for i in range(0, len(rows), ROWS_PER_MESSAGE):
                yield api.ImportStockRequest(reason="demo load", rows=[
                    api.ImportRow(sku=r.sku, location_id=r.location_id, on_hand=r.on_hand)
                    for r in rows[i:i + ROWS_PER_MESSAGE]])

        result = await stub.ImportStock(batches(), metadata=meta)
    log.info("demo loaded: %d locations, %d stock rows (%d SKUs)", len(demo.locations),
             result.rows_received, result.skus)
    return demo
