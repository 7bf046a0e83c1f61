"""How long the key filter's fill (app/key_filter.py) keeps an event loop from its other work.

    python -m benchmarks.key_filter_fill [KEYS] [PAGE ...]   (defaults: 20000 keys; the
                                                               keeper's page, and 1000)

Starts an embedded Valkey (not durable), adds KEYS idempotency keys a page at a time as the
keeper does (`redis_keys.add_keys`), and reports the wall time and the worst loop stall a 1 ms
ticker saw meanwhile: what a call on the worker that fills the filter would wait, at worst.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aredis

from inventory_svc.app.key_filter import PAGE
from inventory_svc.embedded.valkey import EmbeddedRedis
from inventory_svc.storage import redis_keys


async def fill(url: str, count: int, page: int) -> tuple[float, float]:
    client = aredis.from_url(url)
    shape = redis_keys.KeyFilter(bits=2**25, window_s=72 * 3600)
    keys = [(f"key-{i:08d}", time.time() - i % 1000) for i in range(count)]
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - start - 0.001)

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    for i in range(0, count, page):
        await redis_keys.add_keys(client, shape, keys[i:i + page], time.time())
    elapsed = time.perf_counter() - start
    done.set()
    await tick
    await client.aclose()
    return elapsed, worst


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    pages = [int(x) for x in sys.argv[2:]] or [PAGE, 1_000]
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="kf-bench-")), durable=False)
    url = server.start()
    try:
        for page in pages:
            elapsed, worst = asyncio.run(fill(url, count, page))
            print(f"{count} keys, {page} a page: {elapsed * 1e3:.0f} ms in all,"
                  f" worst loop stall {worst * 1e3:.1f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
