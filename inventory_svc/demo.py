"""Load the demo network (real Polish cities): into this process's service (`serve --demo`), or
into a running service over its gRPC API (`demo-load`).

Both set absolute counts, so they would overwrite the counts of a live network: `serve --demo`
loads only into a database with no locations (or finishes a demo load that was interrupted), and
`demo-load` refuses when the service holds stock of the demo's SKUs at its locations, unless
forced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.app.stock import StockService
from inventory_svc.demo_data import DemoNetwork, build_demo, sku_id
from inventory_svc.storage.pg_base import translate_errors
from inventory_svc.storage.pg_bulk import insert_new_stock
from inventory_svc.transport.convert import location_out

log = logging.getLogger(__name__)
ROWS_PER_MESSAGE = 5_000
# serve --demo: stock rows per transaction (one statement; the event loop only builds its arrays,
# so health checks are answered in between)
ROWS_PER_LOAD = 20_000
SKUS_PER_READ = 1_000  # demo-load's stock check: SKUs per GetAvailability


class DemoRefused(RuntimeError):
    """Loading the demo would overwrite counts the service already holds."""


async def demo_wanted(stock: StockService, *, seed: int = 7, sku_count: int = 10_000
                      ) -> tuple[bool, str]:
    """Should `serve --demo` load the demo, and why (for the log)? Into no locations at all: yes.
    Onto the demo's own locations whose last SKU has no stock: yes, a load was interrupted (it
    is in SKU order; absolute counts make loading again safe). Otherwise no: the network is
    there, or another one is, and its counts are not the demo's to overwrite."""
    have = set(stock.ctx.locations)
    if not have:
        return True, "no locations yet"
    if not {loc.id for loc in build_demo(seed, sku_count=1).locations} <= have:
        return False, (f"the database holds {len(have)} other locations: the demo is loaded "
                       "only into an empty one (`inventory-svc demo-load --force` loads it anyway)")
    last = sku_id(sku_count)
    if (await stock.levels_of([last])).get(last):
        return False, "the demo network is loaded already"
    return True, "an earlier demo load did not finish: loading it again"


async def load_demo_into(stock: StockService, *, seed: int = 7, sku_count: int = 10_000
                         ) -> DemoNetwork:
    """`serve --demo`: the locations, then the stock as new rows with their ledger
    (storage/pg_bulk), ROWS_PER_LOAD a transaction in SKU order, each logged with how far the
    load is, called in process (the service is not serving yet: its calls are refused until
    this is done). Rows there already (an interrupted load) are kept."""
    start = time.monotonic()
    demo = build_demo(seed, sku_count=sku_count)
    log.info("demo: loading %d locations and %d stock rows of %d SKUs", len(demo.locations),
             len(demo.stock), sku_count)
    await stock.upsert_locations(list(demo.locations), None)
    rows, done, tenths = demo.stock, 0, 0
    with translate_errors():
        for at in range(0, len(rows), ROWS_PER_LOAD):
            batch = rows[at:at + ROWS_PER_LOAD]
            await insert_new_stock(stock.ctx.pg.pool, [r.sku for r in batch],
                                   [r.location_id for r in batch], [r.on_hand for r in batch],
                                   "demo load")
            done += len(batch)
            if done * 10 // len(rows) > tenths:  # a line every tenth of the way
                tenths = done * 10 // len(rows)
                log.info("demo: %d of %d stock rows loaded (%.0f s)", done, len(rows),
                         time.monotonic() - start)
    return demo


async def held_stock(stub: api_grpc.InventoryServiceAsyncStub, demo: DemoNetwork,
                     meta: tuple[tuple[str, str | bytes], ...] = ()) -> tuple[int, str]:
    """How many demo SKUs have stock rows at the demo's locations there, and one of them."""
    ids = [loc.id for loc in demo.locations]
    found = await stub.ListLocations(api.ListLocationsRequest(ids=ids, include_inactive=True),
                                     metadata=meta)
    present = [loc.id for loc in found.locations]
    if not present:
        return 0, ""
    count, example = 0, ""
    for i in range(0, len(demo.skus), SKUS_PER_READ):
        got = await stub.GetAvailability(api.GetAvailabilityRequest(
            skus=demo.skus[i:i + SKUS_PER_READ], location_ids=present), metadata=meta)
        for item in got.items:
            if item.levels:
                count += 1
                example = example or f"{item.sku} at {item.levels[0].location_id}"
    return count, example


async def load_demo(target: str, *, seed: int = 7, sku_count: int = 10_000,
                    api_key: str = "", force: bool = False) -> DemoNetwork:
    """`demo-load`: upsert the demo locations and import their stock over gRPC (one import
    transaction). Refuses (DemoRefused) when the service holds stock of demo SKUs at demo
    locations, unless `force`. Over plaintext gRPC: a service with principals needs an erp or
    admin `api_key`."""
    demo = build_demo(seed, sku_count=sku_count)
    meta: tuple[tuple[str, str | bytes], ...] = (("x-api-key", api_key),) if api_key else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_grpc.InventoryServiceStub(channel)
        if not force:
            count, example = await held_stock(stub, demo, meta)
            if count:
                raise DemoRefused(
                    f"{target} already holds stock of {count} of the demo's {sku_count} SKUs at "
                    f"its locations (e.g. {example}); loading the demo would overwrite those "
                    "counts. Pass --force to overwrite them")
        log.info("loading the demo network: %d locations, %d SKUs, %d stock rows (one "
                 "transaction)", len(demo.locations), sku_count, len(demo.stock))
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
