"""Assemble and run the service: stores, background tasks, gRPC with health and reflection.

Start: stores → migrations → gRPC listening with every service NOT_SERVING (their calls answered
UNAVAILABLE + RetryInfo by the gate, transport/gate.py) → Redis generation check, rebuilt from
Postgres if needed → `prepare` (`serve --demo` loads the demo network there) → "" and the
InventoryService (and WatchService) SERVING. Meanwhile the routing kernels come in
(routing_warmup.py: about a second from numba's cache, a compile in a child process on a first
start); the RoutingService turns SERVING once they are in and inventory serves.
Shutdown (SIGTERM/SIGINT): health NOT_SERVING → still serving for shutdown_delay_s, while clients
move away → stop taking calls and drain those in flight → stop background tasks
(and a routing warm-up still under way) → close pools → stop embedded servers. Everything after
the drain ends within a bound (stop_budget_s): what is still running then is logged as an ERROR
and left behind, and the pools close under it, so a stuck task cannot hold a pod in Terminating.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from inventory_svc import tracing
from inventory_svc.app.background import Reconciler, run_background
from inventory_svc.app.cancelling import stop_if_cancelled
from inventory_svc.app.context import Context
from inventory_svc.app.reservations import ReservationService
from inventory_svc.app.routing import RoutingService
from inventory_svc.app.sequencer import quiet_before_idle_s
from inventory_svc.app.stock import StockService
from inventory_svc.app.watch import WatchService
from inventory_svc.config import Settings
from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
from inventory_svc.routing_warmup import bring_in
from inventory_svc.startup import StartupError, check_port, hold_data_dir, port_problem
from inventory_svc.storage.pg import PgStore
from inventory_svc.storage.redis_keys import KeyFilter
from inventory_svc.storage.redis_stock import RedisStock
from inventory_svc.transport.admission import AdmissionInterceptor, ListCaps
from inventory_svc.transport.gate import ServiceGate
from inventory_svc.transport.interceptors import MetricsInterceptor
from inventory_svc.transport.inventory_servicer import InventoryServicer
from inventory_svc.transport.overload import ArrivalProbe, LoopLag
from inventory_svc.transport.principals import load_principals
from inventory_svc.transport.registration import generic_handlers_only
from inventory_svc.transport.routing_servicer import RoutingServicer
from inventory_svc.transport.watch_servicer import WatchServicer
from routing.warm import EXPECTED_COMPILE

log = logging.getLogger(__name__)
INVENTORY = api.DESCRIPTOR.services_by_name["InventoryService"].full_name
ROUTING = rp.DESCRIPTOR.services_by_name["RoutingService"].full_name
WATCH = wp.DESCRIPTOR.services_by_name["WatchService"].full_name
SERVICE_NAMES = (INVENTORY, ROUTING, WATCH)
__all__ = ["Running", "StartupError", "check_port", "embedded_stores", "serve"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the drain, stopping the background tasks and closing the pools take at most the drain's
# own grace again, capped here: inside the STOP_MARGIN_S (15 s) the worker supervisor allows
# beyond the grace before it kills a worker (workers.py), and the pod's termination grace.
STOP_BUDGET_S = 10.0
POOL_CLOSE_MIN_S = 1.0  # a pool always gets this long to close gracefully, even past the budget


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
    watch: WatchService | None = None  # WatchStock streams (app/watch.py)
    gate: ServiceGate = field(default_factory=ServiceGate)
    # set when the routing kernels are in this process (RoutingService SERVING once inventory is)
    routing_ready: asyncio.Event = field(default_factory=asyncio.Event)
    inventory_ready: bool = False
    probe: ArrivalProbe | None = None  # overload: the wait of a call arriving now (overload.py)


@contextlib.asynccontextmanager
async def embedded_stores(settings: Settings, *, redis: bool = True) -> AsyncIterator[Settings]:
    """Start the embedded Redis-compatible server and Postgres for the URLs not given, holding
    the data dir (hold_data_dir) while they run; the service reaches both over their Unix
    sockets (local_url)."""
    if not (redis and not settings.redis_url) and settings.database_url:
        yield settings
        return
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    with hold_data_dir(settings.data_dir):
        try:
            if redis and not settings.redis_url:
                r = EmbeddedRedis(settings.data_dir / "redis")
                started.append(r)
                await asyncio.to_thread(r.start)
                settings = replace(settings, redis_url=r.local_url)
            if not settings.database_url:
                p = EmbeddedPostgres(settings.data_dir / "postgres")
                started.append(p)
                await asyncio.to_thread(p.start)
                settings = replace(settings, database_url=p.local_url)
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


def _listen(server: grpc.aio.Server, host: str, port: int,
            credentials: grpc.ServerCredentials | None) -> int:
    """Bind the port (StartupError in one line when that fails); the port bound."""
    address = f"{host}:{port}"
    try:
        return (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpc says only "Failed to bind"; find out why
        check_port(host, port)
        raise StartupError(port_problem(address, "grpc could not bind it")) from None


async def _warm_routing(running: Running) -> None:
    """Bring the routing kernels in (routing_warmup.py), then open the RoutingService."""
    gate, health_servicer = running.gate, running.health

    def compiling() -> None:
        gate.close(ROUTING, "routing is starting: its solver is being compiled (a first start "
                   f"on this machine, {EXPECTED_COMPILE}); inventory calls are served; retry "
                   "later", 10.0)

    log.info("routing: loading the solver's kernels (the RoutingService is NOT_SERVING until "
             "they are in)")
    try:
        what = await bring_in(compiling)
    except Exception:
        log.exception("routing: the solver could not be loaded; the RoutingService stays "
                      "NOT_SERVING on this replica")
        gate.close(ROUTING, "routing is unavailable on this replica: its solver could not be "
                   "loaded (see the service log); retry on another replica", 30.0)
        raise
    log.info("routing: solver ready (%s)", what)
    gc.freeze()  # the kernels live as long as the process, as what the start built (below)
    running.routing_ready.set()
    gate.open(ROUTING)
    if running.inventory_ready:
        await health_servicer.set(ROUTING, SERVING)


def stop_budget_s(settings: Settings) -> float:
    """How long everything after the drain may take (see STOP_BUDGET_S)."""
    return max(POOL_CLOSE_MIN_S, min(settings.shutdown_grace_s, STOP_BUDGET_S))


async def _stop_tasks(tasks: Sequence[asyncio.Task[Any]], until: float) -> None:
    """Cancel `tasks` and wait for them until `until` (loop time). One still running then did
    not honour its cancel (a bug: see app/cancelling.py for how an await can swallow
    one): it is named in an ERROR and left behind, as a shutdown must end."""
    for task in tasks:
        task.cancel()
    loop = asyncio.get_running_loop()
    pending = {task for task in tasks if not task.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, until - loop.time()))
    for task in tasks:
        if task in pending:
            log.error("shutdown: the task %s did not stop when cancelled; left behind (the "
                      "pools close under it)", task.get_name())
        elif not task.cancelled():
            task.exception()  # retrieved: its failure was logged where it happened, if at all


async def _close_within(what: str, close: Awaitable[None], until: float) -> bool:
    """Await `close` until `until` (loop time, but at least POOL_CLOSE_MIN_S); False, logged
    as an ERROR, when it did not finish (it is cancelled then)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(close)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(POOL_CLOSE_MIN_S, until - loop.time()))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        log.error("shutdown: %s did not finish in time; cut short", what)
        return False
    task.result()
    return True


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, background_lock: int | None = None,
                routing_in_background: bool = False,
                prepare: Callable[[Running], Awaitable[None]] | None = None
                ) -> AsyncIterator[Running]:
    """Run the service until the block exits, then shut it down in order (see the module doc).

    `prepare` runs once the stores are ready, before inventory serves (`serve --demo` loads the
    demo there). With `routing_in_background` (the CLI) the block is entered once inventory
    serves, and the RoutingService joins when its kernels are in (`Running.routing_ready`);
    without it (tests, embedding) only once routing serves too. With `background_lock` the
    sweeper and reconciler run only while this process holds that advisory lock (one leader
    among the workers of `serve --workers N`: app/background.py)."""
    settings.validate()  # e.g. refuses a non-loopback address with neither TLS nor principals
    pg = await PgStore.connect(settings.database_url, min_size=settings.pg_pool_min,
                               max_size=settings.pg_pool_max, timeout_s=settings.pg_timeout_s,
                               group_size=settings.group_pool_size)
    pg.wake_others.after_s = quiet_before_idle_s(settings)  # (while another runs the sequencer)
    redis = RedisStock.from_url(settings.redis_url, cluster=settings.redis_cluster,
                                timeout_s=settings.redis_timeout_s,
                                pool_max=settings.redis_pool_max,
                                # traced calls show their hot-path Redis commands: those go
                                # through redis-py then, which OpenTelemetry instruments
                                mux=settings.redis_mux and not settings.tracing)
    # A start finds what the last run left: data built on an earlier Redis process (the embedded
    # Valkey restarts with the service) is routine to drop then; while serving it is not.
    redis.stale_drop_level = logging.INFO
    if settings.key_filter_bits:
        redis.use_key_filter(KeyFilter(settings.key_filter_bits,
                                       settings.retain_idempotency_h * 3600))
    # INVENTORY_TRACING: before grpc.aio.server is made (its instrumentor patches that function)
    traced = tracing.setup(settings)
    loop = asyncio.get_running_loop()
    stop_by: float | None = None  # loop time by which the stop after the drain must be done
    probe: ArrivalProbe | None = None
    try:
        await pg.migrate()
        ctx = Context(settings, pg, redis)
        await ctx.refresh_locations()
        reconciler = Reconciler(ctx)
        stock, reservations = StockService(ctx), ReservationService(ctx)
        routing = RoutingService(ctx, stock, reservations)

        registry = load_principals(settings)
        if registry.open:
            # Open on a loopback address is the development default (validate() refuses it
            # elsewhere): INFO. Opened wider by INVENTORY_ALLOW_INSECURE: WARNING.
            log.log(logging.WARNING if settings.allow_insecure else logging.INFO,
                    "no principals configured: every caller acts as admin; serving %s only "
                    "because it is a loopback address (or INVENTORY_ALLOW_INSECURE)",
                    settings.host)
        loop_lag = LoopLag()
        probe = ArrivalProbe() if settings.queue_budget_ms else None
        admission = AdmissionInterceptor(
            registry, mtls=bool(settings.tls_client_ca), loop_lag=loop_lag, probe=probe,
            queue_budget_s=settings.queue_budget_ms / 1000,
            caps=ListCaps(lines=settings.max_lines, skus=settings.max_skus_per_read,
                          ids=settings.max_ids_per_read, rows=settings.import_max_rows),
            max_in_flight=settings.max_concurrent_rpcs)
        if settings.metrics_port:
            try:
                prometheus_client.start_http_server(settings.metrics_port,
                                                    addr=settings.metrics_host)
            except OSError as exc:
                raise StartupError(port_problem(
                    f"{settings.metrics_host}:{settings.metrics_port} (metrics)",
                    exc.strerror or str(exc))) from None
        gate = ServiceGate("the service is starting: checking redis against postgres; retry "
                           "shortly", retry_after_s=1.0)
        gate.close(ROUTING, "routing is starting: its solver is loading; retry shortly", 1.0)
        # grpc's own limit of concurrent calls is left off: it counts calls whose request has
        # not even arrived (and health checks), so idle callers could fill it. Admission counts
        # calls at work instead; each connection may open at most max_streams_per_connection.
        # (with tracing on, its instrumentor puts its own interceptor before all of these)
        server = grpc.aio.server(
            interceptors=[*tracing.interceptors(traced), MetricsInterceptor(), gate, admission],
            options=server_options(settings))
        # Inventory first: grpc asks the generic handlers in the order they were added
        serves = generic_handlers_only(server)
        api_grpc.add_InventoryServiceServicer_to_server(
            InventoryServicer(stock, reservations), serves)
        rp_grpc.add_RoutingServiceServicer_to_server(RoutingServicer(routing), serves)
        watch = WatchService(ctx)
        wp_grpc.add_WatchServiceServicer_to_server(WatchServicer(watch), serves)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        for name in ("", *SERVICE_NAMES):  # grpc's default for "" is SERVING
            await health_servicer.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, serves)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), serves)
        port = _listen(server, settings.host, settings.port, server_credentials(settings))
        if probe is not None:
            server.add_insecure_port(probe.address)  # a socket only our OS user reaches
        probes = None
        if settings.health_port:
            # kubelet's gRPC probes speak plaintext only: a listener that serves health alone
            probes = grpc.aio.server(options=server_options(settings))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer,
                                                         generic_handlers_only(probes))
            _listen(probes, settings.host, settings.health_port, None)
            await probes.start()
        await server.start()
        running = Running(settings, port, ctx, stock, reservations, reconciler, health_servicer,
                          routing, watch, gate, probe=probe)
        warming = asyncio.create_task(_warm_routing(running), name="routing warm-up")
        tasks: list[asyncio.Task[Any]] = []
        try:
            log.info("listening on %s:%d, not serving yet: checking redis against postgres",
                     settings.host, port)
            await reconciler.ensure_generation(startup=True)
            stop_if_cancelled()  # a stop during the start ends it here even if a call hid it
            redis.stale_drop_level = logging.WARNING
            if prepare is not None:
                await prepare(running)
                stop_if_cancelled()
            tasks.append(asyncio.create_task(
                run_background(ctx, reservations, reconciler, lock=background_lock),
                name="background work (sweeper, reconciler, watch sequencer, location refresh)"))
            tasks.append(asyncio.create_task(loop_lag.run(), name="loop lag probe"))
            if probe is not None:
                tasks.append(asyncio.create_task(probe.run(), name="arrival probe"))
            if not routing_in_background:
                await asyncio.shield(warming)  # its failure fails the start
            # What start-up built (modules, compiled kernels, the location cache) lives as long
            # as the process: out of the cyclic collector's sight, its full collections stay
            # short.
            gc.freeze()
            gate.open_all()
            running.inventory_ready = True
            for name in ("", INVENTORY, WATCH):
                await health_servicer.set(name, SERVING)
            if running.routing_ready.is_set():
                await health_servicer.set(ROUTING, SERVING)
            log.info("serving on %s:%d%s", settings.host, port, "" if running.routing_ready.is_set()
                     else " (routing once its solver is in)")
            yield running
        finally:
            await health_servicer.enter_graceful_shutdown()
            if running.inventory_ready and settings.shutdown_delay_s > 0:
                log.info("stopping: NOT_SERVING; the calls that still come are served for %g s"
                         " while clients move to other replicas", settings.shutdown_delay_s)
                await asyncio.sleep(settings.shutdown_delay_s)
            # streams end now (UNAVAILABLE, where to resume), not at the grace
            await _close_within("closing the WatchStock streams", watch.close(),
                                loop.time() + stop_budget_s(settings))
            await server.stop(settings.shutdown_grace_s)
            if probes is not None:
                await probes.stop(0)
            stop_by = loop.time() + stop_budget_s(settings)
            await _close_within("finishing the group commits in flight", reservations.close(),
                                stop_by)
            await _stop_tasks([*tasks, warming], stop_by)
    finally:
        if probe is not None:
            probe.remove_socket()
        until = stop_by if stop_by is not None else loop.time() + stop_budget_s(settings)
        await _close_within("closing the redis pool", redis.close(), until)
        # asyncpg waits for every connection to be given back first: one a stuck task holds
        # would hold the close for ever; cut short, the pool is terminated (asyncpg does that
        # when its close is cancelled; done here again to be sure)
        if not await _close_within("closing the postgres pool", pg.close(), until):
            pg.pool.terminate()
        if traced is not None:
            traced.shutdown()  # exports the spans still queued
