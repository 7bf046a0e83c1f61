"""Admission before work: who calls, may it call this, may it call now — then decode.

The interceptor decides from the call's metadata alone, before grpc reads the request: a call
with no or an unknown key, a role that may not call the method, or a principal over its rate is
answered at once by a handler that never reads the request, so such a caller holds no slot and
makes the service decode nothing. An admitted call's request arrives as bytes and is decoded
here, so bytes that do not decode are INVALID_ARGUMENT (grpc itself would say UNKNOWN/INTERNAL),
and every list in it is checked against its cap before any use case sees it.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter

from inventory_svc.domain.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from inventory_svc.domain.principal import ANONYMOUS, Principal
from inventory_svc.transport.errors import to_status
from inventory_svc.transport.overload import ArrivalProbe, LoopLag
from inventory_svc.transport.principals import Registry

SHED = Counter("inventory_shed_total", "calls refused at once because the service is overloaded")
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and tooling
_CURRENT: ContextVar[Principal] = ContextVar("inventory_principal", default=ANONYMOUS)
F = TypeVar("F", bound=Callable[..., Any])


def current_principal() -> Principal:
    """The principal of the call being served (set by the admission wrapper for its task)."""
    return _CURRENT.get()


@dataclass(frozen=True, slots=True)
class ListCaps:
    """The longest list a request may carry, by field name (default: `lines`)."""

    lines: int
    skus: int
    ids: int
    locations: int = 10_000
    # ImportStock's rows: a bulk load sends thousands a message (demo-load 5,000); the servicer
    # counts them over the whole stream against import_max_rows, the message size bounds one.
    rows: int = 2_000_000

    def of(self, field: str) -> int:
        if field == "skus":
            return self.skus
        if field == "rows":
            return self.rows
        if field in ("ids", "location_ids", "excluded_location_ids"):
            return self.ids
        if field == "locations":
            return self.locations
        return self.lines


def check_lists(msg: Message, caps: ListCaps, prefix: str = "") -> None:
    """RESOURCE_EXHAUSTED naming the first repeated field over its cap; nested singular messages
    (RoutingOrder) are walked, elements of a list are not (they are bounded by the list)."""
    for fd, value in msg.ListFields():
        if isinstance(value, Message):
            check_lists(value, caps, f"{prefix}{fd.name}.")
        elif not isinstance(value, str | bytes | int | float):  # a repeated field (or a map)
            limit = caps.of(fd.name)
            if len(value) > limit:
                raise ResourceExhausted(
                    f"{prefix}{fd.name}: {len(value)} items exceed the limit of {limit}",
                    subject=f"{prefix}{fd.name}")


class _Bucket:
    """A token bucket: `rate` calls a second on average, `size` at once."""

    __slots__ = ("rate", "size", "stamp", "tokens")

    def __init__(self, rate: float, size: int) -> None:
        self.rate, self.size = rate, float(size)
        self.tokens, self.stamp = float(size), time.monotonic()

    def take(self) -> float:
        """0 if a call may go now, else the seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Clients send `x-api-key: KEY` (or `authorization: Bearer KEY`), or present a client
    certificate (mTLS) whose identity maps to a principal."""

    def __init__(self, registry: Registry, *, mtls: bool, caps: ListCaps,
                 max_in_flight: int, loop_lag: LoopLag | None = None,
                 probe: ArrivalProbe | None = None, queue_budget_s: float = 0.0) -> None:
        self.registry = registry
        self.mtls = mtls
        self.caps = caps
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        # Overload: a call that would wait longer than the budget before it is even looked at
        # is answered RESOURCE_EXHAUSTED at once (with when to retry), so the calls accepted
        # keep their latency instead of everyone queueing for seconds.
        self.loop_lag = loop_lag
        self.queue_budget_s = queue_budget_s
        self.shed = 0
        self.probe = probe
        self._buckets: dict[str, _Bucket] = {}
        self._wrapped: dict[tuple[str, int], Any] = {}
        self._refusals: dict[tuple[str, str, float], Any] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method or ""
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        name = method.rsplit("/", 1)[-1]
        if self.queue_budget_s and self.loop_lag is not None:
            lag = self.loop_lag.lag()
            if self.probe is not None:
                self.probe.busy = True
                lag = max(lag, self.probe.wait())
            if lag > self.queue_budget_s:
                self.shed += 1
                SHED.inc()
                return self._refuse(ResourceExhausted(
                    "the service is overloaded: calls wait longer than its queue budget of "
                    f"{self.queue_budget_s * 1000:g} ms before it takes them; retry",
                    subject="service/queue_budget",
                    retry_after_s=min(1.0, math.ceil(lag * 10) / 10)))
        who: Principal | None = ANONYMOUS
        if not self.registry.open:
            key = _key_of(details.invocation_metadata)
            who = self.registry.by_key(key)
            if who is None and (key or not self.mtls):
                return self._refuse(Unauthenticated(
                    "missing or unknown API key (send x-api-key)" if not key
                    else "unknown API key"))
        if who is not None:
            refusal = self._admit(who, name)
            if refusal is not None:
                return self._refuse(refusal)
        return self._wrap(method, name, handler, who)

    def _admit(self, who: Principal, name: str) -> DomainError | None:
        if not who.may_call(name):
            return PermissionDenied(f"role {who.role.value!r} may not call {name}")
        rate = who.quotas.calls_per_second
        if rate > 0:
            bucket = self._buckets.get(who.name)
            if bucket is None:
                size = who.quotas.burst or max(1, math.ceil(rate))
                bucket = self._buckets[who.name] = _Bucket(rate, size)
            wait = bucket.take()
            if wait > 0:
                return ResourceExhausted(
                    f"principal {who.name!r} is over its rate of {rate:g} calls/s",
                    subject=f"principal/{who.name}/calls_per_second",
                    # rounded up to 10 ms: a refusal is one of a few cached handlers
                    retry_after_s=math.ceil(wait * 100) / 100)
        return None

    def _refuse(self, err: DomainError) -> Any:
        """A handler that answers `err` without reading the request: a client-streaming
        handler's behaviour starts before any message arrives, whatever the method's kind.
        Kept per distinct answer, so a flood of refused calls allocates nothing new."""
        cache_key = (type(err).__name__, err.message,
                     err.retry_after_s if isinstance(err, ResourceExhausted) else 0.0)
        made = self._refusals.get(cache_key)
        if made is not None:
            return made
        status = to_status(err)

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort_with_status(status)  # type: ignore[attr-defined]

        if len(self._refusals) >= 1_000:
            self._refusals.clear()
        made = self._refusals[cache_key] = grpc.stream_unary_rpc_method_handler(refuse)
        return made

    def _wrap(self, method: str, name: str, handler: Any, who: Principal | None) -> Any:
        """The method's handler, taking raw bytes and decoding them itself; made once a method
        and kind of caller (known from a key, or to be found from the peer's certificate)."""
        slot = (method, 0 if who is None else 1)
        made = self._wrapped.get(slot)
        if made is not None and made[0] is handler:
            return made[1]
        decode: Callable[[bytes], Message] = handler.request_deserializer
        # None: grpc sends the answer as it is, bytes its servicer encoded (answers_encoded)
        encode = None if getattr(handler.unary_unary, "answers_encoded", False) else (
            handler.response_serializer)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = await self._principal(context, name)
                try:
                    request = decode(raw)
                    check_lists(request, self.caps)
                except (DecodeError, DomainError) as exc:
                    await _abort(context, exc)
                return await self._run(principal, behavior, request, context)

            wrapped = grpc.unary_unary_rpc_method_handler(unary, None, encode)
        elif handler.stream_unary is not None:
            behavior = handler.stream_unary

            async def streaming(raws: AsyncIterator[bytes],
                                context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = await self._principal(context, name)
                return await self._run(principal, behavior,
                                       _decoded(raws, decode, self.caps), context)

            wrapped = grpc.stream_unary_rpc_method_handler(streaming, None, encode)
        elif handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def server_streaming(raw: bytes,
                                       context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = await self._principal(context, name)
                try:
                    request = decode(raw)
                    check_lists(request, self.caps)
                except (DecodeError, DomainError) as exc:
                    await _abort(context, exc)
                # Not counted in max_in_flight: a stream stays open for hours and is idle most
                # of them; the service that serves it caps its own (watch_max_streams).
                token = _CURRENT.set(principal)
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for msg in result:
                            await context.write(msg)
                        return None
                    return await result
                finally:
                    _CURRENT.reset(token)

            wrapped = grpc.unary_stream_rpc_method_handler(server_streaming, None, encode)
        else:
            return handler  # bidirectional streams: none; they keep grpc's own decoding
        self._wrapped[slot] = (handler, wrapped)
        return wrapped

    async def _principal(self, context: grpc.aio.ServicerContext[Any, Any], name: str
                         ) -> Principal:
        """The principal known from the key, else the one of the peer's certificate."""
        key = _key_of(context.invocation_metadata())
        if self.registry.open:
            return ANONYMOUS
        who = self.registry.by_key(key) if key else None
        if who is not None:
            return who
        who = self.registry.by_identities(_peer_identities(context))
        if who is None:
            await _abort(context, Unauthenticated(
                "no API key, and the client certificate maps to no principal"))
            raise AssertionError("unreachable: abort raises")
        refusal = self._admit(who, name)
        if refusal is not None:
            await _abort(context, refusal)
        return who

    async def _run(self, principal: Principal, behavior: Any, request: Any,
                   context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if self.in_flight >= self.max_in_flight:
            await _abort(context, ResourceExhausted(
                f"the service is at its limit of {self.max_in_flight} calls in flight; retry",
                subject="service/max_concurrent_rpcs", retry_after_s=0.05))
        self.in_flight += 1
        token = _CURRENT.set(principal)
        try:
            return await behavior(request, context)
        finally:
            _CURRENT.reset(token)
            self.in_flight -= 1


def answers_encoded(method: F) -> F:
    """Mark a unary servicer method that returns its response already encoded (bytes): its
    wrapped handler sends the bytes as they are instead of serializing a message."""
    method.answers_encoded = True  # type: ignore[attr-defined]
    return method


async def _decoded(raws: AsyncIterator[bytes], decode: Callable[[bytes], Message], caps: ListCaps
                   ) -> AsyncIterator[Any]:
    # Raised, not aborted: the servicer reads this stream inside its own error handling, which
    # answers a DomainError with its status (an abort here would surface there as an unexpected
    # error, logged, and a second abort).
    async for raw in raws:
        try:
            msg = decode(raw)
            check_lists(msg, caps)
        except DecodeError:
            raise _undecodable() from None
        yield msg


def _undecodable() -> InvalidArgument:
    return InvalidArgument([FieldViolation(
        "request", "the request bytes do not decode as this method's message "
                   "(e.g. a string field that is not valid UTF-8)")])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    err = exc if isinstance(exc, DomainError) else _undecodable()
    await context.abort_with_status(to_status(err))  # type: ignore[attr-defined]


def _key_of(metadata: Any) -> str:
    for k, v in metadata or ():
        if k == "x-api-key":
            return str(v)
        if k == "authorization" and isinstance(v, str) and v[:7].lower() == "bearer ":
            return v[7:].strip()
    return ""


def _peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The client certificate's subject CN and SANs, as grpc's auth context reports them."""
    auth: Mapping[str, Iterable[bytes]] = context.auth_context() or {}
    out: list[str] = []
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        out += [v.decode(errors="replace") for v in auth.get(prop, ())]
    return out
