"""What the fault tests share: their own stores, a service in process or as a killable process,
a load of clients that logs every acknowledged mutation, and the invariant checks I1-I7."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.embedded import EmbeddedRedis
from inventory_svc.server import Running, serve
from inventory_svc.storage.redis_stock import RedisStock
from tests.conftest import Stores, settings_for, store_location, uid
from tests.invariants import assert_postgres_invariants, assert_redis_equals_postgres

REPO = Path(__file__).resolve().parents[2]
Stub = api_grpc.InventoryServiceStub


# ---- polling ------------------------------------------------------------------------------------
async def eventually(check: Callable[[], Awaitable[object]], *, within: float, what: str,
                     every: float = 0.05) -> float:
    """Poll `check` (truthy = done, AssertionError = not yet) until the deadline; return the
    seconds it took. The deadline is the behaviour under test, never a sleep."""
    start = time.monotonic()
    last: BaseException | None = None
    while True:
        try:
            if await check():
                return time.monotonic() - start
        except AssertionError as exc:
            last = exc
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within:g}s ({last})")
        await asyncio.sleep(every)


# ---- own stores ----------------------------------------------------------------------------------
def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{user}127.0.0.1:{port}", parts.path, parts.query, ""))


def port_of(url: str) -> int:
    return urlsplit(url).port or 0


async def fresh_database(base_url: str) -> str:
    """A database of its own on the session's Postgres server, so a fault test neither sees nor
    disturbs the rest of the suite (its own generation marker, its own data)."""
    name = "faults_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError:
        return base_url  # an outside server that does not let us: share its database
    finally:
        await conn.close()
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


@dataclass
class Site:
    """Stores of one fault test: its own Redis process and its own database."""

    redis: EmbeddedRedis
    database_url: str
    root: Path

    @property
    def redis_url(self) -> str:
        return self.redis.url


@contextlib.asynccontextmanager
async def own_site(stores: Stores, *, durable_redis: bool = False) -> AsyncIterator[Site]:
    # Not pytest's tmp_path (see tests/conftest.py): data under a root of our own.
    root = Path(tempfile.mkdtemp(prefix="inventory-faults-"))
    redis = EmbeddedRedis(root / "redis", durable=durable_redis)
    try:
        await asyncio.to_thread(redis.start)
        yield Site(redis, await fresh_database(stores.database_url), root)
    finally:
        await asyncio.to_thread(redis.stop)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def own_site_sync(stores: Stores, *, durable_redis: bool = False) -> Iterator[Site]:
    """own_site for a synchronous test (one that drives a service on another thread)."""
    root = Path(tempfile.mkdtemp(prefix="inventory-faults-"))
    redis = EmbeddedRedis(root / "redis", durable=durable_redis)
    try:
        redis.start()
        yield Site(redis, asyncio.run(fresh_database(stores.database_url)), root)
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def site_settings(stores: Stores, site: Site, **overrides: object) -> Any:
    # passes between full ones look at changes (and holds) only: the faults meet both kinds
    base: dict[str, object] = dict(redis_url=site.redis_url, database_url=site.database_url,
                                   reconcile_full_every=3, reconcile_seq_window_s=0.5)
    base.update(overrides)
    return settings_for(stores, **base)


# ---- a service as a process of its own ----------------------------------------------------------
class ServiceProcess:
    """`python -m inventory_svc.cli serve` against given stores; kill -9 or SIGTERM it. One
    process unless `workers=N` is given (then a supervisor and N workers: `workers()`)."""

    def __init__(self, redis_url: str, database_url: str, log_dir: Path, **settings: object) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
        env.update(INVENTORY_REDIS_URL=redis_url, INVENTORY_DATABASE_URL=database_url,
                   INVENTORY_PORT="0", INVENTORY_LOG_LEVEL="WARNING", INVENTORY_MIN_TTL_S="1",
                   INVENTORY_QUEUE_BUDGET_MS="0",  # no shedding on a busy CI box
                   # stops at once: the tests whose clients move away on SIGTERM set a delay
                   INVENTORY_SHUTDOWN_DELAY_S="0",
                   INVENTORY_WORKERS="1", PYTHONPATH=str(REPO))
        for name, value in settings.items():
            env["INVENTORY_" + name.upper()] = str(value)
        self.env = env
        self.log_path = log_dir / f"service-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._serving = threading.Event()
        self._lines: list[str] = []

    def start(self, timeout: float = 120.0) -> ServiceProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inventory_svc.cli", "serve"], env=self.env, cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._serving.wait(timeout):
            self.kill()
            raise AssertionError(f"service did not start within {timeout}s:\n{self.log_tail()}")
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._lines.append(line)
                if "serving gRPC on" in line and not self._serving.is_set():
                    self.port = int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
                    self._serving.set()

    def log_tail(self, n: int = 40) -> str:
        return "".join(self._lines[-n:])

    def workers(self) -> dict[int, int]:
        """Worker index -> pid of its latest start ("worker I pid P serving on ...")."""
        found: dict[int, int] = {}
        for line in list(self._lines):
            words = line.split()
            if line.startswith("worker ") and words[2:3] == ["pid"] and "serving" in words:
                found[int(words[1])] = int(words[3])
        return found

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9: no shutdown, no cleanup, in-flight calls cut off."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


async def wait_serving(target: str, within: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def serving() -> bool:
            try:
                got = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return got.status == health_pb2.HealthCheckResponse.SERVING

        await eventually(serving, within=within, what=f"{target} SERVING")


# ---- an in-process service on given stores --------------------------------------------------------
@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[tuple[Running, Stub, grpc.aio.Channel]]:
    async with serve(settings) as svc, grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        yield svc, api_grpc.InventoryServiceStub(ch), ch


# ---- a little world --------------------------------------------------------------------------------
@dataclass
class World:
    locations: list[str]
    skus: list[str]
    on_hand: int

    def pairs(self) -> list[tuple[str, str]]:
        return [(s, loc) for s in self.skus for loc in self.locations]


async def make_world(stub: Stub, *, locations: int = 2, skus: int = 3, on_hand: int = 1000) -> World:
    locs = [uid("L") for _ in range(locations)]
    await stub.UpsertLocations(api.UpsertLocationsRequest(
        locations=[store_location(x) for x in locs]), timeout=30)
    sku_ids = [uid("SKU") for _ in range(skus)]
    await stub.ImportStock(
        iter([api.ImportStockRequest(rows=[
            api.ImportRow(sku=s, location_id=loc, on_hand=on_hand) for s in sku_ids for loc in locs
        ])]), timeout=30)
    return World(locs, sku_ids, on_hand)


# ---- load that logs acknowledgements --------------------------------------------------------------
# Business refusals (short stock) and "retry, nothing was confirmed": nothing else, ever.
# DEADLINE_EXCEEDED: cut while its COMMIT was in flight, the outcome is unknown (not an ack)
ALLOWED_DURING_FAULTS = {
    grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class Ledger:
    """What clients were told: every acknowledged mutation, and every status code seen."""

    reserved: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> line
    committed: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)
    adjusted: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # movement -> delta
    codes: Counter[str] = field(default_factory=Counter)
    odd: list[str] = field(default_factory=list)  # codes outside what the fault allows
    reads_ok: int = 0
    reads_failed: list[tuple[float, str]] = field(default_factory=list)
    acks: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, what) mutations
    first_unavailable: float | None = None
    last_unavailable: float | None = None

    def saw(self, code: grpc.StatusCode, what: str, allowed: set[grpc.StatusCode]) -> None:
        self.codes[code.name] += 1
        if code is grpc.StatusCode.UNAVAILABLE:
            now = time.monotonic()
            self.first_unavailable = self.first_unavailable or now
            self.last_unavailable = now
        if code not in allowed:
            self.odd.append(f"{what}: {code.name}")


class Load:
    """`clients` concurrent clients doing reserve / release / commit / adjust / read on a world,
    until stopped. Every answer is logged in `ledger`."""

    channel_options: list[tuple[str, Any]] = []  # grpc channel options of every client

    def __init__(self, target: str | Callable[[], str], world: World, *, clients: int = 8,
                 deadline: float = 5.0, allowed: set[grpc.StatusCode] | None = None,
                 seed: int = 1, reads: bool = True) -> None:
        self.target = target
        self.world = world
        self.clients = clients
        self.deadline = deadline
        self.allowed = allowed or ALLOWED_DURING_FAULTS
        self.ledger = Ledger()
        self.rng = random.Random(seed)
        self.reads = reads
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.calls = 0
        self._next = 0
        self.started: dict[int, float] = {}  # call number -> start, while running
        self.finished: list[tuple[int, str]] = []  # (call number, code)

    def _target(self) -> str:
        return self.target() if callable(self.target) else self.target

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until_calls(self, n: int, within: float = 60.0) -> None:
        start = self.calls

        async def enough() -> bool:
            return self.calls - start >= n
        await eventually(enough, within=within, what=f"{n} calls of load")

    async def _client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        mine: list[str] = []
        ch: grpc.aio.Channel | None = None
        target = ""
        try:
            while not self._stop.is_set():
                if ch is None or target != self._target():
                    if ch is not None:
                        await ch.close()
                    target = self._target()
                    ch = grpc.aio.insecure_channel(target, options=self.channel_options)
                stub = api_grpc.InventoryServiceStub(ch)
                number = self._next
                self._next += 1
                self.started[number] = time.monotonic()
                code = await self._one(stub, rng, mine)
                self.finished.append((number, code))
                del self.started[number]
                self.calls += 1
        finally:
            if ch is not None:
                await ch.close()

    async def _one(self, stub: Stub, rng: random.Random, mine: list[str]) -> str:
        w, led, t = self.world, self.ledger, self.deadline
        sku, loc = rng.choice(w.pairs())
        roll = rng.random()
        try:
            if roll < 0.45 or not mine:
                qty = rng.randint(1, 3)
                key = uid("k") if rng.random() < 0.5 else ""
                out = await stub.Reserve(api.ReserveRequest(
                    lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
                    idempotency_key=key, ttl_seconds=600), timeout=t)
                led.reserved[out.reservation.id] = (sku, loc, qty)
                led.acks.append((time.monotonic(), "reserve"))
                mine.append(out.reservation.id)
            elif roll < 0.6:
                res_id = mine.pop(rng.randrange(len(mine)))
                await stub.ReleaseReservation(
                    api.ReleaseReservationRequest(reservation_id=res_id), timeout=t)
                led.released.add(res_id)
                led.acks.append((time.monotonic(), "release"))
            elif roll < 0.72:
                res_id = mine.pop(rng.randrange(len(mine)))
                await stub.CommitReservation(
                    api.CommitReservationRequest(reservation_id=res_id, idempotency_key=uid("c")),
                    timeout=t)
                led.committed.add(res_id)
                led.acks.append((time.monotonic(), "commit"))
            elif roll < 0.8:
                delta = rng.randint(1, 5)
                adj = await stub.AdjustStock(api.AdjustStockRequest(
                    sku=sku, location_id=loc, delta=delta, reason=api.ADJUSTMENT_REASON_RECEIPT,
                    idempotency_key=uid("a")), timeout=t)
                led.adjusted[adj.movement.id] = (sku, loc, delta)
                led.acks.append((time.monotonic(), "adjust"))
            elif self.reads:
                try:
                    await stub.GetAvailability(api.GetAvailabilityRequest(
                        skus=[sku], location_ids=[loc]), timeout=t)
                except grpc.aio.AioRpcError as err:
                    led.reads_failed.append((time.monotonic(), err.code().name))
                    raise
                led.reads_ok += 1
            led.codes["OK"] += 1
            return "OK"
        except grpc.aio.AioRpcError as err:
            led.saw(err.code(), f"{err.details()}", self.allowed)
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION and "stock" not in (
                    err.details() or "") and "not ACTIVE" not in (err.details() or ""):
                led.odd.append(f"FAILED_PRECONDITION: {err.details()}")
            await asyncio.sleep(0.01)  # a client backs off a little after an error
            return err.code().name


# ---- invariants across both stores -----------------------------------------------------------------
async def check_all(pool: asyncpg.Pool, redis: Any, skus: Sequence[str],
                    ledger: Ledger | None = None) -> None:
    """I1-I4 and I7 over the SKUs, I5 for every acknowledged mutation in `ledger`. Call when
    nothing is in flight (I4 is then exact: Redis equals Postgres and no hold record is left)."""
    rows = await assert_postgres_invariants(pool, skus)
    await assert_redis_equals_postgres(RedisStock(redis), rows, skus)
    # I7: every terminal state reached once (one terminal event per reservation)
    twice = await pool.fetch(
        "SELECT payload->>'reservation_id' AS id, count(*) FROM outbox WHERE kind = 'RESERVATION'"
        " AND payload->>'status' <> 'ACTIVE' GROUP BY 1 HAVING count(*) > 1")
    assert not twice, f"I7: reservations ended more than once: {[dict(x) for x in twice]}"
    if ledger is not None:
        await check_acknowledged(pool, ledger)


async def check_acknowledged(pool: asyncpg.Pool, ledger: Ledger) -> None:
    """I5: every acknowledged mutation is committed in Postgres with its ledger rows and event."""
    ids = list(ledger.reserved)
    found = {r["id"]: r["status"] for r in await pool.fetch(
        "SELECT id, status FROM reservations WHERE id = ANY($1::text[])", ids)}
    lost = [i for i in ids if i not in found]
    assert not lost, f"I5: {len(lost)} acknowledged reservations missing in postgres: {lost[:5]}"
    events = {r["id"] for r in await pool.fetch(
        "SELECT payload->>'reservation_id' AS id FROM outbox WHERE kind = 'RESERVATION'"
        " AND payload->>'reservation_id' = ANY($1::text[])", ids)}
    assert not [i for i in ids if i not in events], "I5: a reservation without its outbox event"
    wrong = [i for i in ledger.committed if found.get(i) != "COMMITTED"]
    assert not wrong, f"I5: acknowledged commits not COMMITTED: {wrong[:5]}"
    wrong = [i for i in ledger.released if found.get(i) != "RELEASED"]
    assert not wrong, f"I5: acknowledged releases not RELEASED: {wrong[:5]}"
    sold = {r["reservation_id"] for r in await pool.fetch(
        "SELECT DISTINCT reservation_id FROM movements WHERE reservation_id = ANY($1::text[])"
        " AND kind = 'SALE'", list(ledger.committed))}
    assert sold == ledger.committed, "I5: a commit without its SALE movement"
    moves = {r["id"] for r in await pool.fetch(
        "SELECT id FROM movements WHERE id = ANY($1::bigint[])", list(ledger.adjusted))}
    assert moves == set(ledger.adjusted), "I5: an acknowledged adjustment is missing"


async def redis_matches_postgres(pool: asyncpg.Pool, redis: Any, skus: Sequence[str]) -> bool:
    """check_all as a poll condition."""
    await check_all(pool, redis, skus)
    return True
