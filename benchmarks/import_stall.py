"""What a bulk ImportStock does to the other calls of the worker that takes it.

    python -m benchmarks.import_stall   (env: SKUS=4000 demo SKUs, ROUNDS=2)

Starts the harness's stack with one worker (INVENTORY_WORKERS=1, so the import and the probe
share an event loop) on a demo of SKUS SKUs, then per round: a probe reads one SKU's
availability in turn for 1 s alone, then again while an ImportStock, sent by a process of its
own, sets every stock row of the demo (new counts each round, so every row changes). Prints
the import's rows and time, and the probe's p50 / p99 / max latency alone and during the
import: the longest a call waited behind the import.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.queues import Queue
from pathlib import Path

import grpc

from benchmarks.load import stack
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as g

SKUS = int(os.environ.get("SKUS", "4000"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


async def probe(stub: g.InventoryServiceStub, sku: str, until: asyncio.Event | float
                ) -> tuple[list[float], int]:
    """Latencies (ms) of availability reads in turn, until the event is set or the time; and
    how many were shed (RESOURCE_EXHAUSTED: the worker's loop ran past its queue budget)."""
    out: list[float] = []
    shed = 0
    while not (until.is_set() if isinstance(until, asyncio.Event) else time.monotonic() > until):
        start = time.perf_counter()
        try:
            await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            shed += 1
        out.append((time.perf_counter() - start) * 1e3)
    return out, shed


def summary(got: tuple[list[float], int]) -> str:
    ms, shed = sorted(got[0]), got[1]
    return (f"p50 {statistics.median(ms):.1f} / p99 {ms[int(len(ms) * 0.99)]:.1f} /"
            f" max {ms[-1]:.1f} ms over {len(ms)} reads, {shed} shed")


async def load(target: str, sku_locs: dict[str, list[str]], n: int) -> float:
    """The import of round n (new counts each round, so every row changes): its time in s."""
    rows = [api.ImportRow(sku=s, location_id=loc, on_hand=1_000 + n)
            for s, locs in sorted(sku_locs.items()) for loc in locs]

    async def batches() -> AsyncIterator[api.ImportStockRequest]:
        for i in range(0, len(rows), 5_000):
            yield api.ImportStockRequest(rows=rows[i:i + 5_000], idempotency_key=f"stall-{n}",
                                         reason="import_stall benchmark")

    async with grpc.aio.insecure_channel(target) as ch:
        start = time.perf_counter()
        await g.InventoryServiceStub(ch).ImportStock(batches(), timeout=600)
        return time.perf_counter() - start


def load_process(target: str, sku_locs: dict[str, list[str]], n: int, out: Queue) -> None:
    # in a process of its own: building and sending 155k rows would stall the probe's loop
    out.put(asyncio.run(load(target, sku_locs, n)))


async def round_(target: str, u: stack.Universe, n: int) -> None:
    rows = sum(len(locs) for locs in u.sku_locs.values())
    async with grpc.aio.insecure_channel(target) as probe_ch:
        probe_stub = g.InventoryServiceStub(probe_ch)
        hot = u.skus[0]
        alone = await probe(probe_stub, hot, time.monotonic() + 1.0)
        done = asyncio.Event()
        during = asyncio.create_task(probe(probe_stub, hot, done))
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        loader = ctx.Process(target=load_process, args=(target, u.sku_locs, n, out))
        loader.start()
        took = await asyncio.to_thread(out.get)
        await asyncio.to_thread(loader.join)
        done.set()
        print(f"round {n}: import of {rows} rows took {took:.2f} s")
        print(f"  reads alone:         {summary(alone)}")
        print(f"  reads during import: {summary(await during)}")


def main() -> None:
    os.environ["INVENTORY_WORKERS"] = "1"
    st = stack.LocalStack(skus=SKUS, log_dir=Path(tempfile.mkdtemp(prefix="import-stall-")))
    st.start()
    try:
        u = asyncio.run(stack.discover(st.target, SKUS, locations=20, seed=1))
        for n in range(ROUNDS):
            asyncio.run(round_(st.target, u, n))
    finally:
        st.stop()


if __name__ == "__main__":
    main()
