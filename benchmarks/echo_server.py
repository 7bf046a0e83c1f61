"""A bare grpc.aio echo server: the Python gRPC ceiling our RPCs are compared against.

With `--workers N` it runs as our service does: N processes on one port (grpc sets SO_REUSEPORT,
so the kernel spreads connections over them), each with its own event loop, so a ratio to echo
compares the same number of processes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import grpc

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(port: int, announce: bool) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if announce:
        print("echo ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1, help="processes on the port")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    # the others first, each in its own interpreter (grpc must not be forked once started); the
    # parent announces itself last, so "ready" means its port is bound (the children's binds
    # are the kernel's to spread connections over as they come up)
    children = [subprocess.Popen([sys.executable, "-m", "benchmarks.echo_server", "--port",
                                  str(args.port), "--child"])
                for _ in range(max(0, args.workers - 1))] if not args.child else []

    def stop(*_: object) -> None:
        for child in children:
            child.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(ImportError):  # the loop our service and the peer run on
        import uvloop

        uvloop.install()
    try:
        asyncio.run(serve(args.port, announce=not args.child))
    finally:
        for child in children:
            child.terminate()
        os._exit(0)


if __name__ == "__main__":
    main()
