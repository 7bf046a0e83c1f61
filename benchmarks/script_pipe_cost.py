"""What the hot path's auto-pipelined scripts (storage/script_pipe.py) cost this process, a call.

    python -m benchmarks.script_pipe_cost [--calls 3000] [--rounds 3]

Starts an embedded Valkey (durable off, its Unix socket) and runs one one-line script (INCRBY) by
ScriptPipe over the pipelined connection (RedisMux), sequentially and eight callers at once, in
two ways alternated in each round:
- "written at once": as the service does, the turn's pipeline is written as the turn ends
  (Coalescer's `start`), its answers handed out from the reply's callback;
- "in a task": the turn's pipeline sent from a task of its own (Coalescer without `start`), as
  before 2026-12-02.
Prints the process CPU and the wall time a call. A Reserve makes two such sends (its hold, and
the settle of its group), so at low load this is paid twice a call.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from inventory_svc.embedded.valkey import EmbeddedRedis
from inventory_svc.storage.coalesce import Coalescer
from inventory_svc.storage.redis_mux import RedisMux
from inventory_svc.storage.script_pipe import ScriptPipe


async def measure(url: str, calls: int, rounds: int) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="calls a measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="script-pipe-")), durable=False)
    server.start()
    try:
        uvloop.run(measure(server.local_url, args.calls, args.rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
