"""RouteOrder end to end at 500 locations x 20 lines, in process, and where its time goes.

    python -m benchmarks.route_latency [--mode kept|reread] [--calls 200] [--no-uvloop]

Starts embedded Valkey and PostgreSQL (no fsync) and the service in this process, loads 500
stores and 20 SKUs with 0-5 units at every store (a dense instance: every location can serve
every line, so the exact solver has more to search than in benchmarks/routing_bench.py), and
times `calls` RouteOrder calls over gRPC after 20 warm-up calls: p50/p99 end to end, and the
p50 of the stock matrix read, the capacity read and the solver (in its worker thread).
`--mode reread` drops routing's kept stock columns before each call (every hash read and
decoded again), for an A/B of the column cache.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

import inventory_svc.app.routing as app_routing
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.config import Settings
from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
from inventory_svc.server import serve

TIMES: dict[str, list[float]] = {}


def _instrument(reread: bool) -> None:
    svc = app_routing.RoutingService
    for name in ("capacity_left", "stock_matrix"):
        inner = getattr(svc, name)

        async def timed(self: Any, *a: Any, _inner: Any = inner, _name: str = name) -> Any:
            if reread and _name == "stock_matrix":
                self._columns.clear()
            t0 = time.perf_counter()
            try:
                return await _inner(self, *a)
            finally:
                TIMES.setdefault(_name, []).append(time.perf_counter() - t0)
        setattr(svc, name, timed)
    solve = app_routing.solve

    def timed_solve(*a: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return solve(*a)
        finally:
            TIMES.setdefault("solve (thread)", []).append(time.perf_counter() - t0)
    app_routing.solve = timed_solve  # type: ignore[assignment]


async def run(mode: str, calls: int) -> None:
    _instrument(mode == "reread")
    root = Path(tempfile.mkdtemp(prefix="route-latency-"))
    redis, pg = EmbeddedRedis(root / "redis", durable=False), EmbeddedPostgres(root / "pg",
                                                                               durable=False)
    redis_url, pg_url = redis.start(), pg.start()
    try:
        settings = Settings(redis_url=redis_url, database_url=pg_url, port=0,
                            reconcile_interval_s=3600, queue_budget_ms=0)
        async with serve(settings) as svc, \
                grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stock, routing = api_grpc.InventoryServiceStub(channel), rp_grpc.RoutingServiceStub(channel)
            rnd = random.Random(1)
            locs = [pb.Location(id=f"L{i:03d}", name="store", type=pb.LOCATION_TYPE_STORE,
                                lat=50 + rnd.random() * 4, lon=15 + rnd.random() * 8, active=True,
                                can_ship=True, can_pickup=True, fixed_cost=5, cost_per_km=0.01,
                                cost_per_unit=1) for i in range(500)]
            await stock.UpsertLocations(api.UpsertLocationsRequest(locations=locs))
            skus = [f"RS{i}" for i in range(20)]

            async def rows() -> AsyncIterator[api.ImportStockRequest]:
                yield api.ImportStockRequest(rows=[
                    api.ImportRow(sku=k, location_id=x.id, on_hand=rnd.randint(0, 5))
                    for k in skus for x in locs])
            await stock.ImportStock(rows())
            await svc.ctx.refresh_locations()
            request = rp.RouteOrderRequest(order=rp.RoutingOrder(
                lines=[rp.OrderLine(sku=k, quantity=2) for k in skus], dest_lat=52, dest_lon=21))
            warm = 0
            while warm < 20:  # routing answers UNAVAILABLE until its solver is loaded
                try:
                    await routing.RouteOrder(request)
                    warm += 1
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.2)
            TIMES.clear()
            took = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await routing.RouteOrder(request)
                took.append(time.perf_counter() - t0)
            took.sort()
            print(f"{mode}: RouteOrder p50 {statistics.median(took) * 1e3:.2f} ms, "
                  f"p99 {took[int(len(took) * 0.99)] * 1e3:.2f} ms ({calls} calls)")
            for name, values in TIMES.items():
                print(f"  {name} p50 {statistics.median(values) * 1e3:.2f} ms")
    finally:
        pg.stop()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("kept", "reread"), default="kept")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--no-uvloop", action="store_true",
                    help="asyncio's own loop instead of uvloop (the service's, inventory_svc.cli)")
    args = ap.parse_args()
    if not args.no_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(run(args.mode, args.calls))


if __name__ == "__main__":
    main()
