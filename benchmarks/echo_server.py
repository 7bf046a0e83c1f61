"""A bare grpc.aio echo server: the Python gRPC ceiling our RPCs are compared against."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import grpc

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("echo ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    with contextlib.suppress(ImportError):  # the loop our service and the peer run on
        import uvloop

        uvloop.install()
    asyncio.run(serve(p.parse_args().port))
