"""WatchStock event lag under the harness's `mixed` scenario: commit to consumer, p50/p99, and
events/s.

    python -m benchmarks.watch_lag [--duration 20] [--skus 2000]
    python -m benchmarks.watch_lag --bulk [--skus 2000] [--per-message 100]

Starts the harness's stack (embedded durable Valkey and PostgreSQL, the service with --demo),
opens one unfiltered WatchStock stream from "now", and runs `inventory-bench --scenarios mixed`
against the service in subprocesses: a closed loop of 64 finds the maximum; once every change it
made has reached the stream (its backlog is not the next step's lag), an open loop offers 70 % of
it (`--no-restock`: the demo's stock as loaded, since the harness's restock is one bulk import of
every stock row, 78k events at once, whose backlog is a different measurement). Each event's lag
is the time it was received minus its `committed_at_unix_us` (the commit's time on Postgres'
clock, the same machine's clock here); the figures are those of the events committed during the
70 % run. Target (issue 13): p99 lag ≤ 50 ms at 70 % load.

`--load-nice 19` runs the load generator at the lowest CPU priority: the service, its stores and
the consumer get a core first when they need one, as they would if the load came from other
machines. On this 2-core box it tells the lag the design gives from the lag the shared cores add.

`--bulk` measures the other case instead: no load, one `ImportStock` of every stock row (the
demo's 78k at 2,000 SKUs, each on_hand + 3, one transaction), and the time from the import's
answer until the stream received the last of its events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from benchmarks.load import stack
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc


class Watcher:
    """One stream, read on its own thread and loop (so the harness's load does not delay it)."""

    def __init__(self, target: str, per_message: int = 0) -> None:
        self.target = target
        self.per_message = per_message  # the request's max_events_per_message
        # (received, lag, sequencer's part of it) in seconds: commit -> numbered is the
        # sequencer's, numbered -> received the hub's and the stream's
        self.seen: list[tuple[float, float, float]] = []
        self.errors: list[str] = []
        self.heads = 0  # heartbeats received
        self.last = 0  # the last sequence received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        after = 0
        async with grpc.aio.insecure_channel(self.target) as channel:
            watch = wp_grpc.WatchServiceStub(channel)
            while not self._stop.is_set():
                request = wp.WatchStockRequest(heartbeat_ms=500,
                                               max_events_per_message=self.per_message)
                if after:
                    request.after_sequence = after
                call = watch.WatchStock(request)
                try:
                    async for item in call:
                        if self._stop.is_set():
                            call.cancel()
                            return
                        kind = item.WhichOneof("item")
                        if kind == "heartbeat":
                            self.heads += 1
                            continue
                        if kind not in ("event", "events"):
                            continue
                        now = time.time()
                        for ev in [item.event] if kind == "event" else item.events.events:
                            after = self.last = ev.sequence
                            self.seen.append((
                                now, now - ev.committed_at_unix_us / 1e6,
                                (ev.sequenced_at_unix_us - ev.committed_at_unix_us) / 1e6))
                except grpc.aio.AioRpcError as err:  # cut off or shed: resume where it broke
                    self.errors.append(f"{err.code().name}: {err.details()}")
                    await asyncio.sleep(0.2)


def _figures(lags: list[float]) -> str:
    if not lags:
        return "no events"
    lags = sorted(lags)
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    return (f"{len(lags):,} events, lag p50 {statistics.median(lags) * 1e3:.1f} ms, "
            f"p99 {p99 * 1e3:.1f} ms, max {lags[-1] * 1e3:.1f} ms")


async def _caught_up(database_url: str, watcher: Watcher) -> None:
    """Until every committed change is numbered and the stream has received the last event."""
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            head = await conn.fetchval(
                "SELECT last_seq FROM watch_state WHERE NOT EXISTS (SELECT 1 FROM stock_changes)")
            if head is not None and watcher.last >= head:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def _bulk(local: stack.LocalStack, watcher: Watcher) -> None:
    conn = await asyncpg.connect(local.database_url)
    try:
        # (polls: the database, and below the watcher's thread, have nothing to await)
        while await conn.fetchval("SELECT count(*) FROM stock_changes"):  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the demo's changes numbered first
        rows = await conn.fetch("SELECT sku, location_id, on_hand FROM stock")
    finally:
        await conn.close()
    while not watcher.seen and not watcher.heads:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # the stream is open at the head
    before = len(watcher.seen)
    async with grpc.aio.insecure_channel(local.target) as ch:
        started = time.time()
        await api_grpc.InventoryServiceStub(ch).ImportStock(iter([
            api.ImportStockRequest(rows=[
                api.ImportRow(sku=r["sku"], location_id=r["location_id"], on_hand=r["on_hand"] + 3)
                for r in rows[i:i + 5000]])
            for i in range(0, len(rows), 5000)]))
        answered = time.time()
    while len(watcher.seen) - before < len(rows):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    got = watcher.seen[before:]
    last = max(at for at, _, _ in got)
    numbered = max(n for _, _, n in got)
    print(f"ImportStock of {len(rows):,} rows answered in {answered - started:.1f} s; the stream"
          f" had every event {last - answered:.2f} s later (the last one numbered"
          f" {numbered:.2f} s after its commit); {len(rows) / (last - answered):,.0f} events/s"
          " received")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per step")
    ap.add_argument("--skus", type=int, default=2000)
    ap.add_argument("--bulk", action="store_true",
                    help="no load: one import of every stock row, and how long its events take")
    ap.add_argument("--per-message", type=int, default=0,
                    help="the stream's max_events_per_message (0: one event a message)")
    ap.add_argument("--load-nice", type=int, default=0,
                    help="run the load generator at this niceness (0: as the service): on a"
                         " box it shares with the service, a stand-in for cores of its own")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="watch-lag-"))
    local = stack.LocalStack(skus=args.skus, log_dir=out)
    local.start()
    try:
        watcher = Watcher(local.target, args.per_message)
        watcher.start()
        if args.bulk:
            asyncio.run(_bulk(local, watcher))
            watcher.stop()
            return
        def bench(step: str, *extra: str) -> dict[str, Any]:
            nice = ["nice", "-n", str(args.load_nice)] if args.load_nice else []
            cmd = [*nice, sys.executable, "-m", "benchmarks.load.cli", "--target", local.target,
                   "--database-url", local.database_url, "--redis-url", local.redis_url or "",
                   "--scenarios", "mixed", "--no-anchors", "--no-restock", *extra,
                   "--duration", str(args.duration), "--skus", str(args.skus), "--quiet",
                   "--out", str(out / step)]
            subprocess.run(cmd, check=True)
            mixed = json.loads((out / step / "result.json").read_text())["scenarios"]["mixed"]
            return dict(mixed["steps"][-1])

        # the maximum (a closed loop of 64), then 70 % of it once the stream has caught up: the
        # saturated step's backlog is not the 70 % step's lag
        top = bench("max", "--mode", "closed", "--concurrency", "64")
        asyncio.run(_caught_up(local.database_url, watcher))
        rate = 0.7 * float(top["ops_per_s"])
        started = time.time()
        step = bench("open70", "--mode", "open", "--rate", f"{rate:.0f}")
        ended = time.time()
        time.sleep(1.0)  # the last events on their way
        watcher.stop()
        # the events committed during the 70 % run
        seen = [(lag, numbered) for at, lag, numbered in watcher.seen
                if started <= at - lag <= ended]
        window = [lag for lag, _ in seen]
        print(f"max (closed loop of 64): {top['ops_per_s']:,.0f} ops/s")
        print(f"70 % step ({step['ops_per_s']:,.0f} ops/s served of {rate:,.0f} offered, "
              f"{ended - started:.0f} s): {_figures(window)};"
              f" {len(window) / (ended - started):,.0f} events/s")
        print(f"  of which commit -> numbered: {_figures([n for _, n in seen])}")
        print(f"  of which numbered -> received: {_figures([lag - n for lag, n in seen])}")
        if watcher.errors:
            print(f"stream interruptions: {len(watcher.errors)} ({watcher.errors[:3]})")
    finally:
        local.stop()


if __name__ == "__main__":
    main()
