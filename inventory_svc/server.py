"""Assemble and run the service: stores, background tasks, gRPC with health and reflection.

Start order: stores → migrations → Redis generation check/rebuild → solver warm-up → gRPC
SERVING. Shutdown (SIGTERM/SIGINT): health NOT_SERVING → drain in-flight calls → stop background
tasks → close pools → stop embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.app.background import Reconciler, run_background
from inventory_svc.app.context import Context
from inventory_svc.app.reservations import ReservationService
from inventory_svc.app.routing import RoutingService
from inventory_svc.app.stock import StockService
from inventory_svc.config import Settings
from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
from inventory_svc.storage.pg import PgStore
from inventory_svc.storage.redis_stock import RedisStock
from inventory_svc.transport.admission import AdmissionInterceptor, ListCaps, LoopLag
from inventory_svc.transport.interceptors import MetricsInterceptor
from inventory_svc.transport.inventory_servicer import InventoryServicer
from inventory_svc.transport.principals import load_principals
from inventory_svc.transport.routing_servicer import RoutingServicer
from routing.solver import warm_up

log = logging.getLogger(__name__)
SERVICE_NAMES = (
    api.DESCRIPTOR.services_by_name["InventoryService"].full_name,
    rp.DESCRIPTOR.services_by_name["RoutingService"].full_name,
)


@dataclass
class Running:
    """A started service: what tests and the CLI need to reach into."""

    settings: Settings
    port: int
    ctx: Context
    stock: StockService
    reservations: ReservationService
    reconciler: Reconciler
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped in the stubs)
    routing: RoutingService


@contextlib.asynccontextmanager
async def embedded_stores(settings: Settings, *, redis: bool = True) -> AsyncIterator[Settings]:
    """Start the embedded Redis-compatible server and Postgres for the URLs not given."""
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    try:
        if redis and not settings.redis_url:
            r = EmbeddedRedis(settings.data_dir / "redis")
            started.append(r)
            settings = replace(settings, redis_url=await asyncio.to_thread(r.start))
        if not settings.database_url:
            p = EmbeddedPostgres(settings.data_dir / "postgres")
            started.append(p)
            settings = replace(settings, database_url=await asyncio.to_thread(p.start))
        yield settings
    finally:
        for server in reversed(started):
            await asyncio.to_thread(server.stop)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Limits every connection lives by: the message size grpc refuses before decoding, the
    streams one connection may hold open, and idle/age limits after which a client reconnects
    (so idle connections free their slots and clients rebalance across replicas)."""
    ms = 1000
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * ms)),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * ms)),
        # keepalive enforcement: a client pinging more often than every 10 s without calls is
        # sent GOAWAY after two strikes; the server pings idle connections to find dead peers
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Several workers (serve --workers N) share the port and the kernel spreads new
        # connections over them; one process alone must not silently share a port.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, client certificates are required (mTLS)."""
    if not settings.tls_cert:
        return None
    with open(settings.tls_cert, "rb") as cert, open(settings.tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    ca = None
    if settings.tls_client_ca:
        with open(settings.tls_client_ca, "rb") as fh:
            ca = fh.read()
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, background_lock: int | None = None
                ) -> AsyncIterator[Running]:
    """Run the service until the block exits, then shut it down in order. With
    `background_lock` the sweeper and reconciler run only while this process holds that advisory
    lock (one leader among the workers of `serve --workers N`: app/background.py)."""
    settings.validate()  # e.g. refuses a non-loopback address with neither TLS nor principals
    pg = await PgStore.connect(settings.database_url, min_size=settings.pg_pool_min,
                               max_size=settings.pg_pool_max, timeout_s=settings.pg_timeout_s)
    redis = RedisStock.from_url(settings.redis_url, cluster=settings.redis_cluster,
                                timeout_s=settings.redis_timeout_s)
    try:
        await pg.migrate()
        ctx = Context(settings, pg, redis)
        await ctx.refresh_locations()
        reconciler = Reconciler(ctx)
        await reconciler.ensure_generation(startup=True)
        stock, reservations = StockService(ctx), ReservationService(ctx)
        routing = RoutingService(ctx, stock, reservations)
        # Compile (or load from numba's cache) every solver kernel before SERVING, so no request
        # ever waits for a JIT compile.
        await asyncio.to_thread(warm_up)

        registry = load_principals(settings)
        if registry.open:
            log.warning("no principals configured: every caller acts as admin; serving "
                        "%s only because it is a loopback address (or INVENTORY_ALLOW_INSECURE)",
                        settings.host)
        loop_lag = LoopLag()
        admission = AdmissionInterceptor(
            registry, mtls=bool(settings.tls_client_ca), loop_lag=loop_lag,
            queue_budget_s=settings.queue_budget_ms / 1000,
            caps=ListCaps(lines=settings.max_lines, skus=settings.max_skus_per_read,
                          ids=settings.max_ids_per_read, rows=settings.import_max_rows),
            max_in_flight=settings.max_concurrent_rpcs)
        if settings.metrics_port:
            prometheus_client.start_http_server(settings.metrics_port, addr=settings.metrics_host)
        # grpc's own limit of concurrent calls is left off: it counts calls whose request has
        # not even arrived (and health checks), so idle callers could fill it. Admission counts
        # calls at work instead; each connection may open at most max_streams_per_connection.
        server = grpc.aio.server(interceptors=[MetricsInterceptor(), admission],
                                 options=server_options(settings))
        api_grpc.add_InventoryServiceServicer_to_server(
            InventoryServicer(stock, reservations), server)
        rp_grpc.add_RoutingServiceServicer_to_server(RoutingServicer(routing), server)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        probes = None
        if settings.health_port:
            # kubelet's gRPC probes speak plaintext only: a listener that serves health alone
            probes = grpc.aio.server(options=server_options(settings))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
            probes.add_insecure_port(f"{settings.host}:{settings.health_port}")
            await probes.start()
        await server.start()

        background = asyncio.create_task(
            run_background(ctx, reservations, reconciler, lock=background_lock))
        lag_watch = asyncio.create_task(loop_lag.run())
        # What start-up built (modules, compiled kernels, the location cache) lives as long as
        # the process: out of the cyclic collector's sight, its full collections stay short.
        gc.freeze()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d", settings.host, port)
        try:
            yield Running(settings, port, ctx, stock, reservations, reconciler, health_servicer,
                          routing)
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(settings.shutdown_grace_s)
            if probes is not None:
                await probes.stop(0)
            await reservations.close()
            background.cancel()
            lag_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
            with contextlib.suppress(asyncio.CancelledError):
                await lag_watch
    finally:
        await redis.close()
        await pg.close()
