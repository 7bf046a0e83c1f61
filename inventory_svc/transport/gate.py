"""Calls to a service that is not ready yet are answered UNAVAILABLE, with when to retry.

The gRPC port is open from early in the start (so health checks get an answer, NOT_SERVING,
while Redis is rebuilt from Postgres or the demo loads), but a call must not see a half-built
Redis or a half-loaded network: until the server marks a service ready, its calls get
UNAVAILABLE + RetryInfo (nothing was done: retry) from a handler that never reads the request.
Health checking and reflection always pass. The RoutingService stays closed, on its own, while
its solver kernels load or compile (inventory_svc/routing_warmup.py).
"""

from __future__ import annotations

from typing import Any

import grpc

from inventory_svc.domain.errors import Unavailable
from inventory_svc.transport.admission import OPEN_SERVICES
from inventory_svc.transport.errors import to_status


def _refusal(message: str, retry_after_s: float) -> Any:
    status = to_status(Unavailable(message, retry_after_s=retry_after_s))

    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort_with_status(status)  # type: ignore[attr-defined]

    # a stream-unary handler answers before any request message arrives, whatever the method's
    # kind (as admission.py's refusals do)
    return grpc.stream_unary_rpc_method_handler(refuse)


class ServiceGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Starts with every service closed ("the service is starting") until `open_all`; a service
    may also be closed on its own (by its full name, e.g. inventory.v1.RoutingService). A call
    passes when neither closes its service."""

    def __init__(self, message: str = "the service is starting; retry shortly",
                 retry_after_s: float = 1.0) -> None:
        self._starting: Any | None = _refusal(message, retry_after_s)
        self._closed: dict[str, Any] = {}

    def starting(self, message: str, retry_after_s: float) -> None:
        """What every service answers until `open_all` (say what the start is doing now)."""
        self._starting = _refusal(message, retry_after_s)

    def open_all(self) -> None:
        self._starting = None

    def close(self, service: str, message: str, retry_after_s: float) -> None:
        self._closed[service] = _refusal(message, retry_after_s)

    def open(self, service: str) -> None:
        self._closed.pop(service, None)

    def is_open(self, service: str) -> bool:
        return self._starting is None and service not in self._closed

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self._starting is None and not self._closed:  # serving: one test a call
            return await continuation(details)
        method: str = details.method or ""
        if not method.startswith(OPEN_SERVICES):
            refusal = self._closed.get(method[1:].partition("/")[0], self._starting)
            if refusal is not None:
                return refusal
        return await continuation(details)
