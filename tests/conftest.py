"""Test base: real Redis and real Postgres, the service over real gRPC.

By default the fixtures start an embedded Valkey and an embedded PostgreSQL (no fsync, for speed)
in a temporary directory. To run the suite against other servers, set
INVENTORY_TEST_REDIS_URL and INVENTORY_TEST_DATABASE_URL (e.g. a standard Redis 7 and Postgres 15);
the suite only ever adds its own uniquely named SKUs and locations there.

Redis topologies: a module marked `redis_cluster` runs its tests that use `stores` twice, against
the single server ([redis]) and against a 3-master Redis Cluster of embedded Valkey nodes
([cluster], started once for the session, inventory_svc.embedded.cluster; or the cluster at
INVENTORY_TEST_REDIS_CLUSTER_URL) with a database of its own on the same Postgres server.
`redis_cluster(soak=True)` runs the cluster variant only under --soak (the default run keeps a
representative subset, for time).

The suite runs in one process per usable CPU (pytest-xdist, at most 4), each with embedded stores
of its own; a file's tests stay in one process, so its module fixtures start once. Given external
stores it runs in one process: they are shared, and the Redis-flush test flushes that Redis.
"""

from __future__ import annotations

# isort: off
import inventory_svc  # noqa: F401  (first: it turns gRPC's fork handlers off before gRPC starts)
# isort: on

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.config import Settings
from inventory_svc.cpus import usable_cpus
from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
from inventory_svc.embedded.cluster import EmbeddedRedisCluster
from inventory_svc.server import Running, serve

# data_dir and track, for the tests that start embedded servers of their own
pytest_plugins = ["tests.embedded_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the long soak/chaos versions of the fault and model-based tests")


EXTERNAL_STORES = ("INVENTORY_TEST_REDIS_URL", "INVENTORY_TEST_DATABASE_URL",
                   "INVENTORY_TEST_REDIS_CLUSTER_URL")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a process per CPU this run may use (cgroup aware), at most 4 (each starts its own
    Postgres, Valkey and cluster); one when the stores are external and so shared."""
    if any(os.environ.get(name) for name in EXTERNAL_STORES):
        return 1
    return min(usable_cpus(), 4)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis_cluster(soak=False): also run against a Redis Cluster (with soak=True "
        "only under --soak)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses `stores` gets a topology: [redis], and [cluster] where its module (or
    it) is marked redis_cluster. All of them parametrized, so that the session's stores and
    service are set up once per topology (pytest groups the tests by it)."""
    if "redis_topology" not in metafunc.fixturenames:
        return
    topologies = ["redis"]
    marker = metafunc.definition.get_closest_marker("redis_cluster")
    if marker is not None and (not marker.kwargs.get("soak")
                               or metafunc.config.getoption("--soak")):
        topologies.append("cluster")
    metafunc.parametrize("redis_topology", topologies, indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        # the long versions run for minutes each (50 kill -9 rounds alone take ~5)
        for item in items:
            item.add_marker(pytest.mark.timeout(1800))


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True under --soak: tests scale their rounds/examples up to the long versions."""
    return bool(request.config.getoption("--soak"))


@dataclass
class Stores:
    redis_url: str
    database_url: str
    redis_server: EmbeddedRedis | None
    pg_server: EmbeddedPostgres | None
    redis_cluster: EmbeddedRedisCluster | None = None  # the embedded cluster of [cluster]
    cluster: bool = False  # redis_url is a Redis Cluster

    @property
    def topology(self) -> str:
        return "cluster" if self.cluster else "redis"


@pytest.fixture(scope="session")
def stores_root() -> Iterator[Path]:
    # Not under pytest's basetemp: a second pytest session on the machine resets that tree to
    # 0700, cutting the unprivileged postgres user off its data mid-run.
    root = Path(tempfile.mkdtemp(prefix="inventory-test-stores-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_store(stores_root: Path) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    database_url = os.environ.get("INVENTORY_TEST_DATABASE_URL", "")
    if database_url:
        yield database_url, None
        return
    pg_server = EmbeddedPostgres(stores_root / "postgres", durable=False)
    try:
        yield pg_server.start(), pg_server
    finally:
        pg_server.stop()


@pytest.fixture(scope="session")
def single_redis(stores_root: Path) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    redis_url = os.environ.get("INVENTORY_TEST_REDIS_URL", "")
    if redis_url:
        yield redis_url, None
        return
    redis_server = EmbeddedRedis(stores_root / "redis", durable=False)
    try:
        yield redis_server.start(), redis_server
    finally:
        redis_server.stop()


@pytest.fixture(scope="session")
def cluster_redis(stores_root: Path) -> Iterator[tuple[str, EmbeddedRedisCluster | None]]:
    """The session's Redis Cluster: 3 masters, no replicas (the failover tests start their own).
    Tests keep to their own uniquely named keys, so nothing is flushed between them."""
    redis_url = os.environ.get("INVENTORY_TEST_REDIS_CLUSTER_URL", "")
    if redis_url:
        yield redis_url, None
        return
    cluster = EmbeddedRedisCluster(stores_root / "redis-cluster", masters=3)
    try:
        yield cluster.start(), cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_topology(request: pytest.FixtureRequest) -> str:
    """"redis" or "cluster" (see pytest_generate_tests)."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture(scope="session")
def stores(request: pytest.FixtureRequest, redis_topology: str,
           postgres_store: tuple[str, EmbeddedPostgres | None]) -> Stores:
    database_url, pg_server = postgres_store
    if redis_topology == "redis":
        redis_url, redis_server = request.getfixturevalue("single_redis")
        return Stores(redis_url, database_url, redis_server, pg_server)
    # the cluster's service gets a database of its own: the two services never share a
    # Postgres generation with two Redis read models of it
    redis_url, cluster = request.getfixturevalue("cluster_redis")
    return Stores(redis_url, _cluster_database(database_url), None, pg_server, cluster,
                  cluster=True)


def _cluster_database(base_url: str) -> str:
    """A database "inventory_cluster" beside base_url's (created once), or base_url itself on an
    outside server that does not let us create one."""
    import asyncio
    import concurrent.futures
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    async def create() -> bool:
        conn = await asyncpg.connect(base_url)
        try:
            if not await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = 'inventory_cluster'"):
                await conn.execute('CREATE DATABASE "inventory_cluster"')
        except asyncpg.InsufficientPrivilegeError:
            return False
        finally:
            await conn.close()
        return True

    # on a thread of its own: this thread's event loop belongs to pytest-asyncio
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        created = pool.submit(asyncio.run, create()).result()
    if not created:
        return base_url
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/inventory_cluster", parts.query, ""))


def settings_for(stores: Stores, **overrides: object) -> Settings:
    base: dict[str, object] = dict(
        redis_url=stores.redis_url, redis_cluster=stores.cluster,
        database_url=stores.database_url, port=0,
        sweep_interval_s=0.1, reconcile_interval_s=3600.0, pg_pool_max=40, min_ttl_s=1,
        shutdown_grace_s=2.0, shutdown_delay_s=0.0,
        # no overload shedding: a busy CI box must not turn a slow loop into RESOURCE_EXHAUSTED
        # (tests/security/test_shedding.py turns it on)
        queue_budget_ms=0,
        # generous store timeouts: a busy 2-core CI box must not turn slowness into UNAVAILABLE
        redis_timeout_s=10.0, pg_timeout_s=10.0,
    )
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def service(stores: Stores) -> AsyncIterator[Running]:
    async with serve(settings_for(stores)) as running:
        yield running


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(service: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> api_grpc.InventoryServiceStub:
    return api_grpc.InventoryServiceStub(channel)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def store_location(loc_id: str, **kw: object) -> pb.Location:
    fields: dict[str, object] = dict(
        id=loc_id, name=loc_id, type=pb.LOCATION_TYPE_STORE, lat=52.23, lon=21.01,
        can_ship=True, can_pickup=True, active=True, priority=50, fixed_cost=20.0,
        cost_per_km=0.03, cost_per_unit=2.0, daily_capacity=100, default_safety_stock=0)
    fields.update(kw)
    return pb.Location(**fields)  # type: ignore[arg-type]


@dataclass
class World:
    """A fresh little network for one test: its own locations and SKUs."""

    locations: list[str]
    skus: list[str]


async def make_world(
    stub: api_grpc.InventoryServiceStub, *, locations: int = 2, skus: int = 2, on_hand: int = 10,
    safety: int = 0,
) -> World:
    locs = [uid("L") for _ in range(locations)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(x, default_safety_stock=safety) for x in locs]))
    sku_ids = [uid("SKU") for _ in range(skus)]
    for sku in sku_ids:
        for loc in locs:
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=on_hand))
    return World(locs, sku_ids)
