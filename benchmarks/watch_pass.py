"""What a WatchStock sequencer pass costs in Postgres (migrations 0008 and 0009).

    python -m benchmarks.watch_pass [BULK] [ROUNDS] [ROWS]   (defaults: 30000, 2000, 10)

Starts an embedded Postgres (not durable) and applies the migrations. Then:

1. **A bulk load when the change queue's statistics say it is empty** (what the sequencer's
   VACUUM or autovacuum leaves of a drained queue): BULK stock rows changed in one transaction,
   and one pass over them timed twice, each in a transaction rolled back so both see the same
   queue, on a fresh connection:
   `watch_number_pass` alone (the pass as 0008 left it, planned from those statistics) and then
   `watch_sequence_pass` (0009: past 500 waiting changes it analyzes the queue and has the pass
   planned again, nested loops off).
2. **The steady state:** ROUNDS passes after a transaction of ROWS changes, and as many idle
   passes, alternating the two functions in blocks of 50: what 0009's count of the queue adds
   to every pass.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from inventory_svc.embedded import EmbeddedPostgres
from inventory_svc.storage.pg_base import PgBase
from inventory_svc.storage.pg_watch import PASS_ROWS

WRAPPED, PLAIN = "watch_sequence_pass", "watch_number_pass"


async def make_stock(url: str, skus: int) -> None:
    base = await PgBase.connect(url, min_size=1, max_size=2, timeout_s=30)
    try:
        await base.migrate()
    finally:
        await base.pool.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO locations (id, type, lat, lon, can_ship, can_pickup, active, priority,"
            " fixed_cost, cost_per_km, cost_per_unit, daily_capacity, default_safety_stock)"
            " VALUES ('L1', 'STORE', 0, 0, true, true, true, 1, 0, 0, 0, 1000, 0)")
        await conn.execute(
            "INSERT INTO stock (sku, location_id, on_hand)"
            " SELECT 'S' || i, 'L1', 1000 FROM generate_series(1, $1) i", skus)
        await conn.fetchrow(f"SELECT * FROM {PLAIN}($1)", 10 * skus)
    finally:
        await conn.close()


async def timed_pass(url: str, function: str) -> tuple[float, int]:
    """One pass over the queue on a fresh connection, rolled back: (seconds, events)."""
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction()
        await tx.start()
        start = time.perf_counter()
        row = await conn.fetchrow(f"SELECT * FROM {function}($1)", PASS_ROWS)
        elapsed = time.perf_counter() - start
        await tx.rollback()
        return elapsed, int(row["events"])
    finally:
        await conn.close()


async def bulk(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER TABLE stock_changes SET (autovacuum_enabled = false)")
        # a drained queue's statistics: one change numbered (deleted), then analyzed
        await conn.execute("UPDATE stock SET version = version + 1 WHERE sku = 'S1'")
        await conn.fetchrow(f"SELECT * FROM {PLAIN}($1)", PASS_ROWS)
        await conn.execute("ANALYZE stock_changes")
        pages, tuples = await conn.fetchrow(
            "SELECT relpages, reltuples FROM pg_class WHERE oid = 'stock_changes'::regclass")
        await conn.execute("UPDATE stock SET on_hand = on_hand + 1, version = version + 1")
    finally:
        await conn.close()
    print(f"bulk: {rows} changes in one transaction; the queue's statistics: {tuples:.0f} rows"
          f" over {pages} pages")
    for function in (PLAIN, WRAPPED):  # in this order: 0009's ANALYZE outlives its rollback
        elapsed, events = await timed_pass(url, function)
        print(f"  {function:20s} {events} events in {elapsed * 1e3:,.0f} ms")


async def steady(url: str, rounds: int, rows: int) -> None:
    writer, sequencer = await asyncpg.connect(url), await asyncpg.connect(url)
    busy: dict[str, list[float]] = {WRAPPED: [], PLAIN: []}
    idle: dict[str, list[float]] = {WRAPPED: [], PLAIN: []}
    try:
        await sequencer.fetchrow(f"SELECT * FROM {PLAIN}($1)", PASS_ROWS)  # the bulk's changes
        await sequencer.execute("VACUUM stock_changes")  # drained again, as the sequencer does
        for k in range(rounds):
            function = (WRAPPED, PLAIN)[k // 50 % 2]
            first = k * rows % 900 + 1
            await writer.execute(
                "UPDATE stock SET on_hand = on_hand + 1, version = version + 1"
                " WHERE sku IN (SELECT 'S' || i FROM generate_series($1::int, $2::int) i)",
                first, first + rows - 1)
            for into in (busy, idle):
                start = time.perf_counter()
                await sequencer.fetchrow(f"SELECT * FROM {function}($1)", PASS_ROWS)
                into[function].append(time.perf_counter() - start)
    finally:
        await writer.close()
        await sequencer.close()
    for function in (PLAIN, WRAPPED):
        b, i = sorted(busy[function]), sorted(idle[function])
        print(f"  {function:20s} a pass of {rows}: median {statistics.median(b) * 1e3:.3f} ms,"
              f" p90 {b[len(b) * 9 // 10] * 1e3:.3f} ms; idle: median"
              f" {statistics.median(i) * 1e3:.3f} ms")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000
    small = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    scratch = Path(tempfile.mkdtemp(prefix="watch-pass-"))
    server = EmbeddedPostgres(scratch / "pg", durable=False)
    url = server.start()
    try:
        asyncio.run(make_stock(url, rows))
        asyncio.run(bulk(url, rows))
        print(f"steady: {rounds} passes of {small} changes, and {rounds} idle passes")
        asyncio.run(steady(url, rounds, small))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
