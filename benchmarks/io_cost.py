"""What the hot path's store plumbing costs this process a call: scripts by ScriptPipe over the
pipelined Redis connection, and queries through asyncpg's pool.

    python -m benchmarks.io_cost [scripts|pool ...] [--calls 3000] [--rounds 3]

`scripts` starts an embedded Valkey (durable off, its Unix socket) and runs one one-line script
(INCRBY) by ScriptPipe over RedisMux, sequentially and eight callers at once, two ways
alternated in each round:
- "written at once": as the service does, the turn's pipeline is written as the turn ends
  (Coalescer's `start`), its answers handed out from the reply's callback;
- "in a task": the turn's pipeline sent from a task of its own (Coalescer without `start`), as
  before 2026-12-02.
A Reserve makes two such sends (its hold, and the settle of its group), so at low load it pays
this twice.

`pool` starts an embedded PostgreSQL (durable off) and runs `SELECT 1`, alternated:
- "acquire(timeout)": `async with pool.acquire(timeout=5)` as the service's units do (on Python
  3.11 asyncpg enforces the timeout with asyncio.wait_for: a task a call);
- "acquire()": no timeout, as the group commit does since 2026-12-02 (its own deadline bounds
  the wait);
- "own connection": the query alone.
The pool resets nothing on release, as the service's do (storage/pg_base.py).

Prints the process CPU (and for scripts the wall time) a call.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import uvloop

from inventory_svc.embedded.postgres import EmbeddedPostgres
from inventory_svc.embedded.valkey import EmbeddedRedis
from inventory_svc.storage.coalesce import Coalescer
from inventory_svc.storage.redis_mux import RedisMux
from inventory_svc.storage.script_pipe import ScriptPipe


async def scripts(url: str, calls: int, rounds: int) -> None:
    client = aioredis.Redis.from_url(url)
    mux = RedisMux.for_url(url, timeout_s=10)
    assert mux is not None
    incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    at_once = ScriptPipe(client, mux)
    in_task = ScriptPipe(client, mux)
    in_task._turns = Coalescer(in_task._send)  # the same pipe with no `start`
    ways = (("in a task", in_task), ("written at once", at_once))
    for _, pipe in ways:  # connected, scripts loaded
        await pipe.run([(incr, ["n"], [1])])
    print("| callers at once | way | round | CPU µs a call | wall µs a call |")
    print("|---|---|---|---|---|")
    for callers in (1, 8):
        for rnd in range(rounds):
            for name, pipe in ways:
                each = calls // callers

                async def caller(pipe: ScriptPipe = pipe, each: int = each) -> None:
                    for _ in range(each):
                        await pipe.run([(incr, ["n"], [1])])

                cpu, wall = time.process_time(), time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(callers)))
                n = each * callers
                print(f"| {callers} | {name} | {rnd + 1} | "
                      f"{(time.process_time() - cpu) / n * 1e6:.1f} | "
                      f"{(time.perf_counter() - wall) / n * 1e6:.1f} |", flush=True)
    await mux.aclose()
    await client.aclose()


async def _leave_as_is(conn: asyncpg.Connection) -> None:
    pass


async def pool(url: str, calls: int, rounds: int) -> None:
    shared = await asyncpg.create_pool(url, min_size=1, max_size=1, reset=_leave_as_is)
    own = await asyncpg.connect(url)

    async def with_timeout() -> None:
        async with shared.acquire(timeout=5) as conn:
            await conn.fetchval("SELECT 1")

    async def no_timeout() -> None:
        async with shared.acquire() as conn:
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
            for _ in range(calls):
                await query()
            print(f"| {rnd + 1} | {name} | {(time.process_time() - cpu) / calls * 1e6:.1f} |",
                  flush=True)
    await own.close()
    await shared.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", help="scripts, pool (default: both)")
    ap.add_argument("--calls", type=int, default=3000, help="calls a measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    servers = {"scripts": (EmbeddedRedis, scripts), "pool": (EmbeddedPostgres, pool)}
    if unknown := set(args.what) - set(servers):
        ap.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    for what in args.what or list(servers):
        kind, measure = servers[what]
        server = kind(Path(tempfile.mkdtemp(prefix=f"io-cost-{what}-")), durable=False)
        server.start()
        try:
            uvloop.run(measure(server.local_url, args.calls, args.rounds))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
