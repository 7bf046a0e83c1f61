"""Servicers added to a grpc.aio server as generic handlers only.

grpcio's generated `add_*Servicer_to_server` adds a generic handler for the service and also
registers each of its methods with the server (`add_registered_method_handlers`). For every
registered method, grpc.aio's serving loop keeps a future for that method's next call, and for
every call that arrives it waits on all of them with `asyncio.wait`: a done-callback added to,
and removed from, each of ~26 futures here (our three services, health and reflection). The
generic handlers serve the same methods through one such future. Measured in
benchmarks/RESULTS.md: ~4-5 % of the service's CPU per Reserve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import grpc


class _GenericOnly:
    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
                                 ) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, Any]) -> None:
        pass  # the generic handler added with them serves the same methods


def generic_handlers_only(server: grpc.aio.Server) -> grpc.aio.Server:
    """What to hand the generated `add_*Servicer_to_server` functions (and grpc's reflection and
    health helpers) instead of `server`: the generic handlers reach it, the registrations are
    dropped. Those functions call nothing else on the server they are given."""
    return cast(grpc.aio.Server, _GenericOnly(server))
