"""What one WatchStock sequencer pass costs Postgres, by the number of changes it numbers.

    python -m benchmarks.watch_pass_cost [--sizes 1,4,16] [--passes 25] [--rounds 2] [VARIANT.sql ...]

Starts the harness's stack (embedded durable Valkey and PostgreSQL, one service process) with the
service's own sequencer paused, so that this script makes every pass: k concurrent Reserve calls
(one group commit, one change each), then one pass (`watch_sequence_pass`, in a transaction of its
own), on a connection whose backend reports its CPU exactly (getrusage around each statement:
`log_executor_stats` for the pass, `log_statement_stats` for its COMMIT, which flushes the WAL and
sends the NOTIFY). stock_changes is vacuumed every 10 passes, as the sequencer does under load.

Unlike `benchmarks.watch_pass` (wall time of bulk and steady passes over stock rows changed
directly, on a bare database), the changes here are real group commits of Reserve calls, whose
pass also looks up their outbox and reservation rows, and the figure is CPU.

Each VARIANT.sql (e.g. a CREATE OR REPLACE of watch_number_pass) is applied in turn, after the
function as it is, and measured the same way: an A/B of the pass in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import tempfile
import uuid
from pathlib import Path

# the service's own sequencer makes one pass at its start, then waits longer than the run
os.environ["INVENTORY_WATCH_SEQUENCE_MS"] = "3600000"
os.environ["INVENTORY_WATCH_IDLE_MS"] = "3600000"
os.environ.setdefault("INVENTORY_WORKERS", "1")

import asyncpg
import grpc

from benchmarks.load import stack
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as g

USAGE = re.compile(r"([\d.]+) s user, ([\d.]+) s system")
SKUS = 300


def cpu_ms(notes: list[str]) -> float | None:
    for note in notes:
        if m := USAGE.search(note):
            return (float(m[1]) + float(m[2])) * 1000
    return None


async def measure(st: stack.LocalStack, u: stack.Universe, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(st.database_url)
    notes: list[str] = []
    conn.add_log_listener(lambda _c, m: notes.append(str(getattr(m, "detail", ""))))
    ch = grpc.aio.insecure_channel(st.target)
    stub = g.InventoryServiceStub(ch)
    rng = random.Random(1)
    skus = sorted(u.sku_locs)

    async def reserve() -> None:
        sku = rng.choice(skus)
        await stub.Reserve(api.ReserveRequest(
            lines=[pb.ReservationLine(sku=sku, location_id=rng.choice(u.sku_locs[sku]), quantity=1)],
            idempotency_key=uuid.uuid4().hex, ttl_seconds=3600))

    async def one_pass() -> tuple[float | None, float | None, int]:
        await conn.execute("BEGIN; SET client_min_messages = log; SET log_executor_stats = on")
        notes.clear()
        row = await conn.fetchrow("SELECT * FROM watch_sequence_pass(20000)")
        executed = cpu_ms(notes)
        await conn.execute("SET log_executor_stats = off; SET log_statement_stats = on")
        notes.clear()
        await conn.execute("COMMIT")
        committed = cpu_ms(notes)
        await conn.execute("SET log_statement_stats = off; SET client_min_messages = notice")
        return executed, committed, int(row["events"] or 0) if row else 0

    await conn.fetch("SELECT * FROM watch_sequence_pass(20000)")  # what the restock left
    await conn.execute("VACUUM stock_changes")
    variants = [("as it is", ""), *args.variants]
    print("| round | pass function | changes a pass | pass CPU ms (median) | COMMIT CPU ms (median) |"
          " whole pass ÷ changes, ms |")
    print("|---|---|---|---|---|---|")
    for rnd in range(args.rounds):
        for name, sql in variants:
            if sql:
                await conn.execute(sql)
            for k in args.sizes:
                runs, commits, events = [], [], 0
                for i in range(args.passes + 3):
                    if i % 10 == 9:
                        await conn.execute("VACUUM stock_changes")
                    await asyncio.gather(*[reserve() for _ in range(k)])
                    executed, committed, n = await one_pass()
                    if i >= 3 and executed is not None and committed is not None:  # warmed up
                        runs.append(executed)
                        commits.append(committed)
                        events += n
                per_pass = statistics.median(runs) + statistics.median(commits)
                print(f"| {rnd + 1} | {name} | {events / len(runs):.1f} | {statistics.median(runs):.2f} |"
                      f" {statistics.median(commits):.2f} | {per_pass / max(k, 1):.3f} |", flush=True)
    await ch.close()
    await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="changes a pass (concurrent Reserves)")
    ap.add_argument("--passes", type=int, default=25, help="passes measured at each size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("variants", nargs="*", help="SQL files applied in turn after the function as is")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.variants = [(p, Path(p).read_text()) for p in args.variants]
    log_dir = Path(tempfile.mkdtemp(prefix="watch-pass-"))
    st = stack.LocalStack(skus=SKUS, log_dir=log_dir)
    st.start()
    try:
        u = asyncio.run(stack.discover(st.target, SKUS, locations=20, seed=1))
        asyncio.run(stack.restock(st.target, u, warehouse_units=10**7, store_units=10**6, key="r"))
        asyncio.run(measure(st, u, args))
    finally:
        st.stop()


if __name__ == "__main__":
    main()
