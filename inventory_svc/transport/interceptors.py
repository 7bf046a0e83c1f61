"""Server interceptors: API-key roles (UNAUTHENTICATED / PERMISSION_DENIED) and Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

RPCS = Counter("inventory_rpc_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram(
    "inventory_rpc_seconds", "RPC latency", ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)

_READ = {"ListLocations", "GetAvailability", "FindNearby", "GetReservation", "ListMovements",
         "RouteOrder"}
_SHOP = _READ | {"Reserve", "ExtendReservation", "ReleaseReservation", "CommitReservation",
                 "ReturnItems", "RouteAndReserve"}
_ERP = _READ | {"UpsertLocations", "SetStock", "AdjustStock", "ImportStock", "TransferStock",
                "SetSafetyStock", "ReturnItems"}
# What each role may call: e-shop/app backends, POS terminals, ERP/WMS integrations, operators.
ROLE_METHODS: Mapping[str, frozenset[str] | None] = {
    "reader": frozenset(_READ),
    "shop": frozenset(_SHOP),
    "pos": frozenset(_SHOP | {"Sell"}),
    "erp": frozenset(_ERP),
    "admin": None,  # everything
}
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and tooling

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def parse_api_keys(spec: str) -> dict[str, str]:
    """"key:role,key:role" → {key: role}; roles must be known (checked at start)."""
    keys: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, role = item.partition(":")
        if not key or role not in ROLE_METHODS:
            raise ValueError(f"{item.split(':')[0][:4]}…: role must be one of {sorted(ROLE_METHODS)}")
        keys[key] = role
    return keys


class _Wrapped:
    """Each method's wrapped handler, made once: grpc looks the same handler up for every call
    of a method, and wrapping it anew (a handler and closures per call) is not free."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, around: Callable[[str], Callable[[Behavior], Behavior]]
            ) -> Any:
        made = self._by_method.get(method)
        if made is None or made[0] is not handler:
            made = (handler, _wrap(handler, around(method.rsplit("/", 1)[-1])))
            self._by_method[method] = made
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


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Clients send `x-api-key: KEY` (or `authorization: Bearer KEY`); each key has a role."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)
        self._wrapped = _Wrapped()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method or ""
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        return self._wrapped.get(method, handler, self._around)

    def _around(self, name: str) -> Callable[[Behavior], Behavior]:
        def around(behavior: Behavior) -> Behavior:
            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                meta = {k: v for k, v in (context.invocation_metadata() or ())}
                key = str(meta.get("x-api-key") or "")
                auth = str(meta.get("authorization") or "")
                if not key and auth.lower().startswith("bearer "):
                    key = auth[7:].strip()
                role = self.keys.get(key)
                if role is None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        "missing or unknown API key (send x-api-key)")
                allowed = ROLE_METHODS[role or ""]
                if allowed is not None and name not in allowed:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"role {role!r} may not call {name}")
                return await behavior(request, context)
            return guarded
        return around


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
