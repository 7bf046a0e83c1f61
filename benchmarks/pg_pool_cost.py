"""What taking a connection from an asyncpg pool costs this process, against a connection of its
own: the client CPU of `SELECT 1` each way.

    python -m benchmarks.pg_pool_cost [--queries 5000] [--rounds 3]

Starts an embedded PostgreSQL (durable off) and runs, alternated in each round:
- "acquire(timeout)": `async with pool.acquire(timeout=5)` as the service's units do (on Python
  3.11 asyncpg enforces the timeout with asyncio.wait_for: a task a call);
- "acquire()": the same with no timeout, as the group commit does since 2026-12-02 (its own
  deadline bounds the wait);
- "own connection": the query alone.
The pools reset nothing on release (as the service's: storage/pg_base.py `_leave_session_as_is`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import uvloop

from inventory_svc.embedded.postgres import EmbeddedPostgres


async def _leave_as_is(conn: asyncpg.Connection) -> None:
    pass


async def measure(url: str, queries: int, rounds: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1, reset=_leave_as_is)
    own = await asyncpg.connect(url)

    async def with_timeout() -> None:
        async with pool.acquire(timeout=5) as conn:
            await conn.fetchval("SELECT 1")

    async def no_timeout() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def own_connection() -> None:
        await own.fetchval("SELECT 1")

    ways: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("acquire(timeout)", with_timeout), ("acquire()", no_timeout),
        ("own connection", own_connection)]
    print("| round | way | client CPU µs a query |")
    print("|---|---|---|")
    for rnd in range(rounds):
        for name, query in ways:
            for _ in range(200):  # warm: statement cache, the pool's connection
                await query()
            cpu = time.process_time()
            for _ in range(queries):
                await query()
            print(f"| {rnd + 1} | {name} | {(time.process_time() - cpu) / queries * 1e6:.1f} |",
                  flush=True)
    await own.close()
    await pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=5000, help="queries a measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pg-pool-")), durable=False)
    server.start()
    try:
        uvloop.run(measure(server.local_url, args.queries, args.rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
