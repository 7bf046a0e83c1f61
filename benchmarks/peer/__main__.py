"""`python -m benchmarks.peer --port P --database-url URL`: run the Postgres-only peer.

With --workers N it runs N processes on the port (SO_REUSEPORT), each with its own loop and
connections; the first migrates the database and runs the sweeper. It prints "peer ready" once
every worker serves.
"""

from __future__ import annotations

# isort: off
import inventory_svc  # noqa: F401  (first: turns gRPC's fork handlers off before gRPC starts)
# isort: on

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys

from benchmarks.peer.server import serve

ENV_URL = "INVENTORY_PEER_DATABASE_URL"  # the database URL, if not given by --database-url


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


async def _main(args: argparse.Namespace) -> None:
    first = not args.child
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(args.database_url, port=args.port, host=args.host, pool_size=args.pool_size,
                     outbox=args.outbox, migrate=first,
                     sweep_interval_s=args.sweep_interval if first else 0.0,
                     reuseport=args.workers > 1) as running:
        children: list[asyncio.subprocess.Process] = []
        if first:
            for _ in range(args.workers - 1):
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "benchmarks.peer", "--child", "--port", str(running.port),
                    "--host", args.host, "--pool-size", str(args.pool_size),
                    *(["--outbox"] if args.outbox else []), "--workers", str(args.workers),
                    stdout=subprocess.PIPE, env=dict(os.environ, **{ENV_URL: args.database_url}),
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 120)
                if b"worker ready" not in line:
                    raise RuntimeError(f"a peer worker did not start: {line!r}")
                children.append(child)
        print("peer worker ready" if args.child else
              f"peer ready on {args.host}:{running.port} ({args.workers} workers, "
              f"{args.pool_size} connections each)", flush=True)
        await stop.wait()
        for child in children:
            child.terminate()
        for child in children:
            await child.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--database-url", default=os.environ.get(ENV_URL),
                   help=f"the peer's own database (default: ${ENV_URL})")
    p.add_argument("--pool-size", type=int, default=16, help="Postgres connections per worker")
    p.add_argument("--workers", type=int, default=1, help="processes on the port")
    p.add_argument("--outbox", action="store_true",
                   help="write the RESERVATION outbox events our service writes")
    p.add_argument("--sweep-interval", type=float, default=1.0,
                   help="seconds between sweeps of due reservations")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.database_url:
        p.error(f"--database-url or ${ENV_URL} is required")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
