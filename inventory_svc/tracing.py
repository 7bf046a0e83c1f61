"""Optional OpenTelemetry tracing of each call through Redis and Postgres (INVENTORY_TRACING).

Off by default, and then nothing here imports OpenTelemetry: the hot path is as it was. On, it
takes the `tracing` extra (`pip install 'inventory-svc[tracing]'`) and uses OpenTelemetry's own
instrumentation, no spans made by hand: a SERVER span for each gRPC call (the grpc.aio server
instrumentor, which must patch `grpc.aio.server` before the server is made), and CLIENT spans
under it for each Redis command or pipeline and each Postgres statement. Spans go to an OTLP/gRPC
collector (the standard OTEL_EXPORTER_OTLP_* variables say where) or, for trying it out, to
stderr, one JSON object a line. With tracing on, the calls' Redis commands go through redis-py,
which OpenTelemetry instruments, instead of the service's own pipelined connection
(storage/redis_mux.py): a traced service spends more CPU a call than an untraced one.

Sampling: parent-based, new traces at INVENTORY_TRACING_SAMPLE, and only traces that start at a
call (the background work's statements are not traced). In a call that is not sampled the Redis
and Postgres instrumentations are switched off (UnsampledQuiet, an interceptor the server puts
first among its own), so a low ratio costs little more than the gRPC instrumentation.

Work that concurrent calls share is traced under the call that started it: the pipeline of
scripts of one event-loop turn (storage/coalesce.py) and a group commit (app/batching.py) are
tasks made in that call's context, so under load the other calls of the batch show no span of
their own for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc  # the service's own dependency; nothing of OpenTelemetry is imported here

if TYPE_CHECKING:
    from inventory_svc.config import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "inventory-svc"
# What each mode imports; one missing means the `tracing` extra is not (fully) installed.
_NEEDED = ("opentelemetry.sdk.trace", "opentelemetry.sdk.trace.export",
           "opentelemetry.instrumentation.grpc", "opentelemetry.instrumentation.asyncpg",
           "opentelemetry.instrumentation.redis")
_NEEDED_OTLP = ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",)
# Not traced: probes and tooling (a kubelet probe every few seconds would be most of the traces),
# and the streams whose handlers write with context.write() instead of yielding (the health
# Watch, WatchStock), which the instrumentor's streaming wrapper cannot iterate.
UNTRACED = ("/grpc.health.", "/grpc.reflection.", "/inventory.v1.WatchService/")


def missing(mode: str) -> str | None:
    """Why tracing in this mode cannot start (a module of the extra will not import), or None.
    Imports the modules: call it only with tracing asked for."""
    for name in (*_NEEDED, *(_NEEDED_OTLP if mode == "otlp" else ())):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return (f"tracing needs the optional extra: pip install 'inventory-svc[tracing]' "
                    f"({name}: {exc})")
    return None


@dataclass
class Tracing:
    """Tracing as set up in this process: `shutdown` exports what is still queued, then takes
    the instrumentation out (so a later `setup` in the same process starts clean)."""

    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    instrumentors: tuple[Any, ...]
    quiet: UnsampledQuiet

    def shutdown(self) -> None:
        for instrumentor in self.instrumentors:
            instrumentor.uninstrument()
        self.provider.shutdown()  # flushes the batch processor, then closes the exporter


def setup(settings: Settings) -> Tracing | None:
    """With INVENTORY_TRACING set: a tracer provider and the instrumentors of grpc.aio servers,
    asyncpg and redis-py. Call it before the gRPC server is made. None when tracing is off."""
    if not settings.tracing:
        return None
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.utils import suppress_instrumentation
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.trace import get_current_span

    from inventory_svc import __version__

    exporter: SpanExporter
    if settings.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, ...
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter(out=sys.stderr,
                                       formatter=lambda span: span.to_json(indent=None) + "\n")
    ours = {"service.name": SERVICE_NAME, "service.version": __version__,
            # each worker of `serve --workers N` is an instance of its own
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"}
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, win over ours
    resource = Resource.create({**ours, **OTELResourceDetector().detect().attributes})
    provider = TracerProvider(resource=resource, sampler=_sampler(settings.tracing_sample))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    traced = _call_filter()
    grpc_server = GrpcAioInstrumentorServer(filter_=traced)  # type: ignore[no-untyped-call]
    # The instrumentor ORs a filter it is given with the one of OTEL_PYTHON_GRPC_EXCLUDED_SERVICES
    # (so with that set, the streams above would be traced, and fail): ours alone, which takes
    # that variable's services in too.
    grpc_server._filter = traced
    instrumentors = (grpc_server, AsyncPGInstrumentor(),  # type: ignore[no-untyped-call]
                     RedisInstrumentor())
    for instrumentor in instrumentors:
        # the provider is handed to each, not set as the global one: the global can be set once
        # a process, and an embedding application may have its own
        instrumentor.instrument(tracer_provider=provider)
    log.info("tracing on: %s, sampling %g of new traces", settings.tracing,
             settings.tracing_sample)
    return Tracing(provider, instrumentors,
                   UnsampledQuiet(lambda: bool(get_current_span().is_recording()),
                                  suppress_instrumentation))


def interceptors(traced: Tracing | None) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """What the server puts first among its own interceptors (right after the instrumentor's,
    which goes before all): nothing when tracing is off."""
    return [] if traced is None else [traced.quiet]


class UnsampledQuiet(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """In a call whose span is not sampled, the Redis and Postgres instrumentations are switched
    off (OpenTelemetry's suppress_instrumentation) rather than left to build attributes and spans
    nobody records: at a low sample ratio that is most of tracing's cost. Unary calls only."""

    def __init__(self, recording: Callable[[], bool],
                 suppress: Callable[[], AbstractContextManager[None]]) -> None:
        self._recording = recording
        self._suppress = suppress
        # each handler's wrapped version, made once (grpc hands out the same few handlers);
        # keyed by the handler's id, the handler kept in the value so its id stays its own
        self._by_handler: dict[int, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        made = self._by_handler.get(id(handler))
        if made is None:
            if len(self._by_handler) >= 10_000:  # refusals are handlers too; bound it anyway
                self._by_handler.clear()
            made = (handler, grpc.unary_unary_rpc_method_handler(
                self._quiet(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer))
            self._by_handler[id(handler)] = made
        return made[1]

    def _quiet(self, behavior: Callable[[Any, Any], Awaitable[Any]]
               ) -> Callable[[Any, Any], Awaitable[Any]]:
        recording, suppress = self._recording, self._suppress

        async def quiet(request: Any, context: Any) -> Any:
            if recording():
                return await behavior(request, context)
            with suppress():
                return await behavior(request, context)
        return quiet


def _sampler(ratio: float) -> Any:
    """Parent-based: a caller's traceparent decides whether its call is sampled; a trace that
    starts here is kept at `ratio`, and only when it starts at a gRPC call (a SERVER span). The
    background work's statements (the sweeper, the reconciler, the watch sequencer's polls) run
    outside any call: traced, they would be a stream of one-span traces, most of the volume."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import SpanKind

    class CallsOnly(Sampler):
        def __init__(self) -> None:
            self._ratio = TraceIdRatioBased(ratio)

        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: SpanKind | None = None, attributes: Any = None,
                          links: Any = None, trace_state: Any = None) -> SamplingResult:
            if kind is not SpanKind.SERVER:
                return SamplingResult(Decision.DROP)
            return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes,
                                             links, trace_state)

        def get_description(self) -> str:
            return f"CallsOnly{{{self._ratio.get_description()}}}"

    return ParentBased(CallsOnly())


def _call_filter() -> Callable[[Any], bool]:
    """Whether a call gets a span: not for the services above, nor those named in
    OTEL_PYTHON_GRPC_EXCLUDED_SERVICES. One string test a call (the instrumentation's own filters
    parse the method name anew for each service, with isinstance tests against typing
    Protocols)."""
    listed = os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "")
    prefixes = (*UNTRACED, *(f"/{name.strip()}/" for name in listed.split(",") if name.strip()))

    def traced(details: Any) -> bool:
        return not (details.method or "").startswith(prefixes)
    return traced
