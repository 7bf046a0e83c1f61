"""Event-loop stall while the reconciler makes full passes, on an embedded data dir that already
holds the demo network (run `inventory-svc serve --demo --data-dir D` once, stop it, then):

    python -m benchmarks.reconcile_lag --data-dir D

A 1 ms ticker runs beside two full passes; its lateness is what every RPC served by the same
replica would wait at that moment.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from inventory_svc.app.background import Reconciler
from inventory_svc.app.context import Context
from inventory_svc.config import Settings
from inventory_svc.server import embedded_stores
from inventory_svc.storage.pg import PgStore
from inventory_svc.storage.redis_stock import RedisStock


async def measure(data_dir: Path, passes: int) -> None:
    async with embedded_stores(Settings(data_dir=data_dir)) as resolved:
        pg = await PgStore.connect(resolved.database_url, min_size=2, max_size=4, timeout_s=60)
        redis = RedisStock.from_url(resolved.redis_url, cluster=False, timeout_s=30)
        try:
            ctx = Context(resolved, pg, redis)
            await ctx.refresh_locations()
            reconciler = Reconciler(ctx)
            await reconciler.ensure_generation(startup=True)
            lags: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                while not done.is_set():
                    t = time.perf_counter()
                    await asyncio.sleep(0.001)
                    lags.append(time.perf_counter() - t - 0.001)

            task = asyncio.create_task(ticker())
            for _ in range(passes):
                t0 = time.perf_counter()
                report = await reconciler.run_pass()
                print(f"pass: {time.perf_counter() - t0:.2f} s over {report.skus} SKUs")
            done.set()
            await task
            lags.sort()
            print(f"loop lag: max {lags[-1] * 1e3:.0f} ms, p99 {lags[int(len(lags) * 0.99)] * 1e3:.1f}"
                  f" ms over {len(lags)} ticks")
        finally:
            await redis.close()
            await pg.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--passes", type=int, default=2)
    args = p.parse_args()
    asyncio.run(measure(args.data_dir, args.passes))


if __name__ == "__main__":
    main()
