"""Prometheus metrics of every call (admission is transport/admission.py)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

RPCS = Counter("inventory_rpc_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram(
    "inventory_rpc_seconds", "RPC latency", ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class _Wrapped:
    """Each handler's wrapped version, made once: grpc (and the admission interceptor) hand out
    the same few handlers for every call of a method, and wrapping anew is not free."""

    def __init__(self) -> None:
        # keyed by the handler's id; the handler is kept in the value, so its id stays its own
        self._by_handler: dict[tuple[str, int], tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, around: Callable[[str], Callable[[Behavior], Behavior]]
            ) -> Any:
        made = self._by_handler.get((method, id(handler)))
        if made is None:
            if len(self._by_handler) >= 10_000:  # refusals are cached too; bound it anyway
                self._by_handler.clear()
            made = (handler, _wrap(handler, around(method.rsplit("/", 1)[-1])))
            self._by_handler[(method, id(handler))] = made
        return made[1]


def _wrap(handler: Any, around: Callable[[Behavior], Behavior]) -> Any:
    """The same kind of handler with its behavior wrapped (grpc's stubs type these loosely)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            around(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            around(handler.stream_unary), handler.request_deserializer,
            handler.response_serializer)
    return handler  # streaming responses: passed through as they are


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self._wrapped = _Wrapped()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        return self._wrapped.get(details.method or "", handler, _timed)


def _timed(name: str) -> Callable[[Behavior], Behavior]:
    latency = LATENCY.labels(name)  # the method's series, looked up once
    counts: dict[str, Any] = {}

    def around(behavior: Behavior) -> Behavior:
        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                got = context.code()
                code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                latency.observe(time.perf_counter() - start)
                if (count := counts.get(code)) is None:
                    count = counts[code] = RPCS.labels(name, code)
                count.inc()
        return timed
    return around
