"""Per-unit figures for the capacity model (docs/CAPACITY.md): the CPU, WAL, rows, bytes and
Redis memory of a reservation, commit, release, expiry and availability read, through gRPC.

    python -m benchmarks.capacity [--reservations 3000] [--concurrency 16] [--json out.json]

Durable embedded Postgres (fsync on) and Valkey (AOF) and `inventory-svc serve --workers 1` (one
process: its CPU is the service's); W warehouses and S stores, "wide" SKUs stocked everywhere (a
hash of ~500 fields) and "narrow" ones at 40 locations (the demo's shape). Around each phase, run
at a fixed concurrency: CPU of the service, Postgres (backends, reaped ones too) and Valkey
(psutil); WAL (pg_current_wal_lsn; pg_walinspect for records and full-page images); transaction
ids assigned; each table's rows, heap and index bytes; Valkey's commands. A phase ends once the
stock event sequencer has drained what it caused. On a shared box trust the CPU per call, not the
throughput, which moves with foreign load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import redis.asyncio as aioredis

from benchmarks.capacity_report import report
from benchmarks.load.stack import free_port, start_logged, stop_process
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc

TABLES = ("stock", "reservations", "reservation_lines", "movements", "outbox", "idempotency",
          "stock_events", "stock_changes", "sku_availability")
CHANNELS = (pb.CHANNEL_WEB, pb.CHANNEL_APP, pb.CHANNEL_POS, pb.CHANNEL_CALL_CENTER,
            pb.CHANNEL_MARKETPLACE)
NARROW_LOCATIONS = 40
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Options:
    reservations: int = 3000  # 1-line reservations (half committed, half released)
    carts: int = 1000  # 3-line reservations (half committed, half released)
    expiring: int = 600  # 1-line reservations left to expire (TTL 1 s)
    hot: int = 1500  # 1-line reservations all on one SKU-location
    routes: int = 500  # RouteAndReserve of 2 lines over every location
    reads: int = 3000  # GetAvailability calls per read phase
    concurrency: int = 16  # calls in flight
    warehouses: int = 5
    stores: int = 500
    wide_skus: int = 900  # > VIEWS_KEPT / 5 channels: cycling them misses the answer cache
    narrow_skus: int = 200
    seed: int = 7


@dataclass(frozen=True)
class Snapshot:
    at: float
    cpu: dict[str, float]
    lsn: int
    xid: int
    sizes: dict[str, tuple[int, int]]  # table: (heap bytes, index bytes)
    rows: dict[str, int]
    redis_calls: dict[str, int]
    groups: dict[str, float]


@dataclass(frozen=True)
class PhaseResult:
    name: str
    ops: int
    errors: dict[str, int]
    seconds: float
    cpu_ms: dict[str, float]  # per op
    wal_bytes: float  # per op, from the LSN
    wal: dict[str, float]  # per op: records, record bytes, fpi count, fpi bytes
    xids: float  # write transactions per op
    rows: dict[str, float]  # per op
    heap_bytes: dict[str, float]  # per op
    index_bytes: dict[str, float]  # per op
    redis_calls: dict[str, float]  # per op
    groups: dict[str, float] = field(default_factory=dict)  # calls per group


class Stack:
    """Durable embedded Postgres and Valkey, and the service as one process given their URLs."""

    def __init__(self, root: Path) -> None:
        from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis

        self.root = root
        self.pg = EmbeddedPostgres(root / "postgres", durable=True)
        self.redis = EmbeddedRedis(root / "redis", durable=True)
        self.service: Any = None
        self.target = ""
        self.metrics_url = ""

    def start(self) -> None:
        redis_url, database_url = self.redis.start(), self.pg.start(timeout=60)
        port, metrics = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
        env.update(INVENTORY_REDIS_URL=redis_url, INVENTORY_DATABASE_URL=database_url,
                   INVENTORY_WORKERS="1", INVENTORY_METRICS_PORT=str(metrics),
                   # a loop late by 50 ms on a shared box would shed calls: measure, not shed
                   INVENTORY_QUEUE_BUDGET_MS="0",
                   # its passes would land in whichever phase they fall in: one full pass is
                   # measured on its own (reconcile_pass)
                   INVENTORY_RECONCILE_INTERVAL_S="3600")
        self.service = start_logged(
            [sys.executable, "-m", "inventory_svc.cli", "serve", "--port", str(port),
             "--data-dir", str(self.root / "svc")],
            "serving gRPC", self.root / "service.log", env=env)
        self.target = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"

    def stop(self) -> None:
        stop_process(self.service)
        for server in (self.pg, self.redis):
            with contextlib.suppress(Exception):
                server.stop()

    def pids(self) -> dict[str, int]:
        return {"service": self.service.pid, "postgres": self.pg.pid, "redis": self.redis.pid,
                "client": os.getpid()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children, live and reaped (Postgres backends)."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            total += ct.user + ct.system
    return float(total)


class Probe:
    """Reads the counters a phase is measured by, straight from the stores."""

    def __init__(self, stack: Stack, conn: asyncpg.Connection, admin: asyncpg.Connection,
                 redis: aioredis.Redis) -> None:
        self.stack, self.conn, self.admin, self.redis = stack, conn, admin, redis

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, stack: Stack) -> AsyncIterator[Probe]:
        url = stack.pg.url
        conn = await asyncpg.connect(url)
        # pg_walinspect in the maintenance database: the service's schema is left as it is
        admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        redis = aioredis.Redis.from_url(stack.redis.url)
        try:
            yield cls(stack, conn, admin, redis)
        finally:
            await redis.aclose()
            await conn.close()
            await admin.close()

    async def snapshot(self) -> Snapshot:
        lsn = await self.conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        xid = await self.conn.fetchval("SELECT txid_current()")
        sizes: dict[str, tuple[int, int]] = {}
        for name, heap, index in await self.conn.fetch(
                "SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid) FROM pg_class c "
                "WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'", list(TABLES)):
            sizes[name] = (int(heap), int(index))
        rows = {t: int(await self.conn.fetchval(f"SELECT count(*) FROM {t}"))
                for t in TABLES if t != "stock"}
        stats = await self.redis.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        cpu = {}
        for name, pid in self.stack.pids().items():
            with contextlib.suppress(psutil.Error):
                cpu[name] = cpu_seconds(pid)
        return Snapshot(time.perf_counter(), cpu, int(lsn), int(xid), sizes, rows, calls,
                        scrape_groups(self.stack.metrics_url))

    async def wal_stats(self, start: int, end: int) -> dict[str, float]:
        """Records, their bytes, records with full-page images and the images' bytes."""
        row = await self.admin.fetchrow(
            "SELECT count(*), sum(record_length - fpi_length), count(*) FILTER (WHERE fpi_length"
            " > 0), sum(fpi_length) FROM pg_get_wal_records_info('0/0'::pg_lsn + $1::numeric, "
            "'0/0'::pg_lsn + $2::numeric)", start, end)
        return {k: float(v or 0) for k, v in zip(("records", "record_bytes", "fpi", "fpi_bytes"),
                                                  row.values(), strict=True)}

    async def drain(self, active_ids: Sequence[str] = ()) -> None:
        """Until the sequencer has numbered every stock change (and the given reservations have
        ended): its writes belong to the phase that caused them."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            pending = await self.conn.fetchval("SELECT count(*) FROM stock_changes")
            if active_ids:
                pending += await self.conn.fetchval(
                    "SELECT count(*) FROM reservations WHERE id = ANY($1::text[]) "
                    "AND status = 'ACTIVE'", list(active_ids))
            if not pending:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the sequencer (or the sweeper) did not catch up in time")


def scrape_groups(url: str) -> dict[str, float]:
    """Sums and counts of the group commit and group settle histograms."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    out: dict[str, float] = {}
    for line in lines:
        m = re.match(r"inventory_group_(commit|settle)_calls_(sum|count) (\S+)", line)
        if m:
            out[f"{m[1]}_{m[2]}"] = out.get(f"{m[1]}_{m[2]}", 0.0) + float(m[3])
    return out


def delta(name: str, ops: int, errors: Counter[str], a: Snapshot, b: Snapshot,
          wal: dict[str, float]) -> PhaseResult:
    n = max(ops, 1)
    groups = {}
    for kind in ("commit", "settle"):
        calls = b.groups.get(f"{kind}_sum", 0) - a.groups.get(f"{kind}_sum", 0)
        count = b.groups.get(f"{kind}_count", 0) - a.groups.get(f"{kind}_count", 0)
        if count:
            groups[kind] = calls / count
    redis_calls = {k: (v - a.redis_calls.get(k, 0)) / n for k, v in b.redis_calls.items()
                   if v - a.redis_calls.get(k, 0) > 0 and k not in ("info",)}
    return PhaseResult(
        name=name, ops=ops, errors=dict(errors), seconds=b.at - a.at,
        cpu_ms={k: (b.cpu[k] - a.cpu.get(k, 0.0)) * 1e3 / n for k in b.cpu},
        wal_bytes=(b.lsn - a.lsn) / n, wal={k: v / n for k, v in wal.items()},
        xids=(b.xid - a.xid - 1) / n,  # the probe's own txid_current() takes one
        rows={t: (b.rows[t] - a.rows.get(t, 0)) / n for t in b.rows},
        heap_bytes={t: (b.sizes[t][0] - a.sizes[t][0]) / n for t in b.sizes},
        index_bytes={t: (b.sizes[t][1] - a.sizes[t][1]) / n for t in b.sizes},
        redis_calls=redis_calls, groups=groups)


async def drive(n: int, concurrency: int, call: Callable[[int], Awaitable[Any]]
                ) -> tuple[list[Any], Counter[str]]:
    """n calls, `concurrency` in flight; the answers in call order (None for a failure)."""
    out: list[Any] = [None] * n
    errors: Counter[str] = Counter()
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            try:
                out[i] = await call(i)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, errors


@dataclass(frozen=True)
class Network:
    warehouses: list[str]
    stores: list[str]
    wide: list[str]
    narrow: list[str]


async def load_network(stubs: list[Any], conn: asyncpg.Connection, o: Options
                       ) -> tuple[Network, dict[str, Any]]:
    """Locations through the API. The narrow SKUs' stock through ImportStock (ledgered, as a
    real load is); the wide SKUs' (~450k rows) by one INSERT, only to keep the run short: every
    measured call goes through gRPC, and Redis loads those SKUs from Postgres when first read."""
    rng = random.Random(o.seed)
    wh = [f"CAP-WH-{i:02d}" for i in range(o.warehouses)]
    st = [f"CAP-ST-{i:04d}" for i in range(o.stores)]
    locs = [pb.Location(id=x, name=x, type=pb.LOCATION_TYPE_WAREHOUSE, lat=52.0 + i * 0.1,
                        lon=19.0 + i * 0.1, can_ship=True, active=True, priority=1)
            for i, x in enumerate(wh)]
    locs += [pb.Location(id=x, name=x, type=pb.LOCATION_TYPE_STORE, lat=49.5 + rng.random() * 4,
                         lon=15.0 + rng.random() * 8, can_ship=True, can_pickup=True, active=True,
                         priority=2) for x in st]
    await stubs[0].UpsertLocations(api.UpsertLocationsRequest(locations=locs), timeout=60)
    net = Network(wh, st, [f"CAP-W-{i:05d}" for i in range(o.wide_skus)],
                  [f"CAP-N-{i:05d}" for i in range(o.narrow_skus)])
    rows = [api.ImportRow(sku=s, location_id=x, on_hand=10**6)
            for s in net.narrow for x in wh + rng.sample(st, NARROW_LOCATIONS - len(wh))]

    async def batches() -> AsyncIterator[api.ImportStockRequest]:
        for i in range(0, len(rows), 5000):
            yield api.ImportStockRequest(rows=rows[i:i + 5000], idempotency_key="capacity-load")

    t0 = time.perf_counter()
    await stubs[0].ImportStock(batches(), timeout=600)
    t1 = time.perf_counter()
    before = await conn.fetchrow("SELECT pg_relation_size('stock') h, pg_indexes_size('stock') i")
    await conn.execute(
        "INSERT INTO stock (sku, location_id, on_hand) SELECT s, l, "
        "CASE WHEN l LIKE 'CAP-WH-%' THEN 1000000000 ELSE 1000000 END "
        "FROM unnest($1::text[]) s CROSS JOIN unnest($2::text[]) l", net.wide, wh + st)
    after = await conn.fetchrow("SELECT pg_relation_size('stock') h, pg_indexes_size('stock') i")
    wide_rows = len(net.wide) * len(wh + st)
    return net, {"import_rows": len(rows), "import_s": t1 - t0, "wide_rows": wide_rows,
                 "stock_heap_per_row": (after["h"] - before["h"]) / wide_rows,
                 "stock_index_per_row": (after["i"] - before["i"]) / wide_rows}


async def redis_memory(r: aioredis.Redis, net: Network, before: int) -> dict[str, float]:
    """Bytes per SKU-location field: the server's whole growth, and MEMORY USAGE of hashes."""
    after = int((await r.info("memory"))["used_memory"])
    fields = len(net.wide) * (len(net.warehouses) + len(net.stores)) + \
        len(net.narrow) * NARROW_LOCATIONS
    out = {"used_memory_per_field": (after - before) / fields}
    for name, skus in (("wide", net.wide[:50]), ("narrow", net.narrow[:50])):
        usage = [int(await r.memory_usage("inv:{" + s + "}", samples=0) or 0) for s in skus]
        count = [int(await r.hlen("inv:{" + s + "}")) for s in skus]
        out[f"{name}_hash_bytes"] = sum(usage) / len(usage)
        out[f"{name}_fields"] = sum(count) / len(count)
        out[f"{name}_bytes_per_field"] = sum(usage) / sum(count)
    # Redis' default keeps hashes of up to 128 fields as a listpack (Valkey 8.1: 512); a wide
    # hash past that is a hashtable: the same fields in a scratch key under Redis' limit
    fields_of: dict[Any, Any] = await r.hgetall("inv:{" + net.wide[0] + "}")
    limit = str((await r.config_get("hash-max-listpack-entries"))["hash-max-listpack-entries"])
    await r.config_set("hash-max-listpack-entries", 128)
    try:
        await r.hset("capacity-probe:{wide}", mapping=fields_of)
        out["wide_hashtable_bytes_per_field"] = int(await r.memory_usage(
            "capacity-probe:{wide}", samples=0) or 0) / len(fields_of)
        await r.delete("capacity-probe:{wide}")
    finally:
        await r.config_set("hash-max-listpack-entries", limit)
    out["listpack_limit"] = float(limit)
    # A hold record as hold.lua writes it ("hold:{sku}", reservation id -> "ms;loc=qty"), in a
    # key of its own shape but outside `hold:{*` (the reconciler would take it for an orphan).
    key = "capacity-probe:{hold}"
    one = {}
    for n in (1, 100):
        await r.delete(key)
        for i in range(n):
            await r.hset(key, f"r{int(time.time() * 1000) + i:011x}{i:016x}",
                         f"{int(time.time() * 1000)};CAP-ST-{i % 500:04d}=1")
        one[n] = int(await r.memory_usage(key, samples=0) or 0)
    await r.delete(key)
    out["hold_key_one_record"] = one[1]
    out["hold_record_in_listpack"] = (one[100] - one[1]) / 99
    return out


class Phases:
    """Runs the measured phases, each at o.concurrency calls in flight, and keeps their figures."""

    def __init__(self, o: Options, chans: list[Any], probe: Probe, net: Network) -> None:
        self.o, self.probe, self.net = o, probe, net
        self.stubs = [api_grpc.InventoryServiceStub(c) for c in chans]
        self.routing = rp_grpc.RoutingServiceStub(chans[0])
        self.rng = random.Random(o.seed + 1)
        self.key = f"cap-{time.time_ns()}"
        self.results: list[PhaseResult] = []

    def stub(self, i: int) -> Any:
        return self.stubs[i % len(self.stubs)]

    async def phase(self, name: str, n: int, call: Callable[[int], Awaitable[Any]],
                    ended: Callable[[list[Any]], Sequence[str]] | None = None) -> list[Any]:
        """n calls; the phase ends when the sequencer has drained (and `ended` ids expired)."""
        a = await self.probe.snapshot()
        got, errors = await drive(n, self.o.concurrency, call)
        await self.probe.drain(ended(got) if ended else ())
        b = await self.probe.snapshot()
        self.results.append(delta(name, n, errors, a, b, await self.probe.wal_stats(a.lsn, b.lsn)))
        print(f"  {name}: {n} calls in {b.at - a.at:.1f} s, errors {dict(errors)}",
              file=sys.stderr, flush=True)
        return got

    def reserve(self, tag: str, lines: Callable[[], list[pb.ReservationLine]], ttl: int
                ) -> Callable[[int], Awaitable[Any]]:
        async def call(i: int) -> Any:
            return await self.stub(i).Reserve(api.ReserveRequest(
                lines=lines(), ttl_seconds=ttl, channel=pb.CHANNEL_WEB,
                idempotency_key=f"{self.key}-{tag}-{i}"), timeout=30)
        return call

    def end(self, tag: str, ids: list[str], commit: bool) -> Callable[[int], Awaitable[Any]]:
        async def call(i: int) -> Any:
            key = f"{self.key}-{tag}-{i}"
            if commit:
                return await self.stub(i).CommitReservation(api.CommitReservationRequest(
                    reservation_id=ids[i], idempotency_key=key), timeout=30)
            return await self.stub(i).ReleaseReservation(api.ReleaseReservationRequest(
                reservation_id=ids[i], idempotency_key=key), timeout=30)
        return call

    def lines(self, n: int) -> Callable[[], list[pb.ReservationLine]]:
        """n lines of random wide SKUs at one random store, a unit each."""
        return lambda: [pb.ReservationLine(sku=s, location_id=at, quantity=1) for at in
                        [self.rng.choice(self.net.stores)] for s in self.rng.sample(self.net.wide, n)]

    async def writes(self) -> None:
        o, net = self.o, self.net
        # Not measured: a SKU's first change makes its sku_availability row, counted from all its
        # stock rows once (a one-time cost, not a reservation's): one reservation per wide SKU.
        warm = iter(net.wide)
        got, _ = await drive(len(net.wide), o.concurrency, self.reserve("w", lambda: [
            pb.ReservationLine(sku=next(warm), location_id=net.stores[0], quantity=1)], 3600))
        await drive(len(net.wide), o.concurrency, self.end("xw", ids(got), commit=False))
        await self.probe.drain()
        r1 = ids(await self.phase("Reserve, 1 line", o.reservations,
                                  self.reserve("r1", self.lines(1), 3600)))
        half = len(r1) // 2
        await self.phase("Commit, 1 line", half, self.end("c1", r1[:half], commit=True))
        await self.phase("Release, 1 line", len(r1) - half, self.end("x1", r1[half:], commit=False))
        r3 = ids(await self.phase("Reserve, 3 lines", o.carts,
                                  self.reserve("r3", self.lines(3), 3600)))
        h3 = len(r3) // 2
        await self.phase("Commit, 3 lines", h3, self.end("c3", r3[:h3], commit=True))
        await self.phase("Release, 3 lines", len(r3) - h3, self.end("x3", r3[h3:], commit=False))
        await self.phase("Reserve, 1 line, TTL 1 s, until the sweeper expired it", o.expiring,
                         self.reserve("rs", self.lines(1), 1), ended=ids)
        hot = [pb.ReservationLine(sku=net.wide[0], location_id=net.warehouses[0], quantity=1)]
        await self.phase("Reserve, 1 line, one hot SKU-location", o.hot,
                         self.reserve("hot", lambda: hot, 3600))

        async def routed(i: int) -> Any:
            return await self.routing.RouteAndReserve(rp.RouteAndReserveRequest(order=rp.RoutingOrder(
                lines=[rp.OrderLine(sku=s, quantity=1) for s in self.rng.sample(net.wide, 2)],
                method=rp.FULFILMENT_METHOD_SHIP, dest_lat=49.5 + self.rng.random() * 4,
                dest_lon=15.0 + self.rng.random() * 8), ttl_seconds=3600,
                idempotency_key=f"{self.key}-rt-{i}"), timeout=30)
        await self.phase(f"RouteAndReserve, 2 lines, {len(net.warehouses) + len(net.stores)} "
                         "locations", o.routes, routed)

    async def idle(self, seconds: float) -> None:
        """Background work alone (sequencer, sweeper, location refresh), per second."""
        a = await self.probe.snapshot()
        await asyncio.sleep(seconds)
        b = await self.probe.snapshot()
        self.results.append(delta("Idle: background work, per second", round(seconds), Counter(),
                                  a, b, await self.probe.wal_stats(a.lsn, b.lsn)))

    def read(self, sku: Callable[[int], str], locations: Callable[[int], list[str]],
             channel: Callable[[int], int]) -> Callable[[int], Awaitable[Any]]:
        async def call(i: int) -> Any:
            return await self.stub(i).GetAvailability(api.GetAvailabilityRequest(
                skus=[sku(i)], location_ids=locations(i), channel=channel(i)),  # type: ignore[arg-type]
                timeout=30)
        return call

    async def reads(self) -> None:
        o, net = self.o, self.net
        wide, narrow = net.wide, net.narrow
        n_loc = len(net.warehouses) + len(net.stores)
        web: Callable[[int], int] = lambda i: int(pb.CHANNEL_WEB)  # noqa: E731
        everywhere: Callable[[int], list[str]] = lambda i: []  # noqa: E731

        def nth_channel(n: int) -> Callable[[int], int]:
            # keys not read before: hydrating read every SKU for WEB
            return lambda i: int(CHANNELS[(1 + i // n) % len(CHANNELS)])

        # the same 100 SKUs again and again (hot product pages): the kept answer is reused
        await self.phase(f"GetAvailability, {n_loc} locations, answer kept", o.reads,
                         self.read(lambda i: wide[i % 100], everywhere, web))
        # every read builds its answer anew: (SKU, channel) keys not read before, more than the
        # 4,096 answers a process keeps
        await self.phase(f"GetAvailability, {n_loc} locations, built anew", o.reads,
                         self.read(lambda i: wide[i % len(wide)], everywhere,
                                   nth_channel(len(wide))))
        span = len(net.stores) - 9
        await self.phase(f"GetAvailability, 10 of {n_loc} locations, built anew", o.reads,
                         self.read(lambda i: wide[i % len(wide)],
                                   lambda i: net.warehouses[:1] + net.stores[i % span:i % span + 9],
                                   web))
        await self.phase(f"GetAvailability, {NARROW_LOCATIONS} locations, built anew", o.reads,
                         self.read(lambda i: narrow[i % len(narrow)], everywhere,
                                   nth_channel(len(narrow))))


def ids(got: list[Any]) -> list[str]:
    return [g.reservation.id for g in got if g is not None]


async def reconcile_pass(stack: Stack, probe: Probe) -> dict[str, float]:
    """One full reconciler pass, run here (the service's are off): CPU per stock row of this
    process (the reconciler's), Postgres and Redis. Every pod's leader makes one every
    reconcile_interval_s x reconcile_full_every."""
    from inventory_svc.app.background import Reconciler
    from inventory_svc.app.context import Context
    from inventory_svc.config import Settings
    from inventory_svc.storage.pg import PgStore
    from inventory_svc.storage.redis_stock import RedisStock

    settings = Settings.from_env({"INVENTORY_REDIS_URL": stack.redis.url,
                                  "INVENTORY_DATABASE_URL": stack.pg.url})
    pg = await PgStore.connect(stack.pg.url, min_size=1, max_size=2, timeout_s=60)
    redis = RedisStock.from_url(stack.redis.url, cluster=False, timeout_s=30)
    try:
        ctx = Context(settings, pg, redis)
        await ctx.refresh_locations()
        rows = int(await probe.conn.fetchval("SELECT count(*) FROM stock"))
        a = await probe.snapshot()
        await Reconciler(ctx).run_pass()  # a new reconciler's first pass is a full one
        b = await probe.snapshot()
    finally:
        await redis.close()
        await pg.close()
    out = {f"{k}_us_per_row": (b.cpu[k] - a.cpu[k]) * 1e6 / rows
           for k in ("client", "postgres", "redis")}
    return {"rows": rows, "seconds": b.at - a.at, **out}


async def run(o: Options, stack: Stack) -> dict[str, Any]:
    chans = [grpc.aio.insecure_channel(stack.target) for _ in range(2)]
    try:
        stubs = [api_grpc.InventoryServiceStub(c) for c in chans]
        async with Probe.open(stack) as probe:
            mem0 = int((await probe.redis.info("memory"))["used_memory"])
            net, setup = await load_network(stubs, probe.conn, o)
            await probe.drain()
            for i in range(0, len(net.wide + net.narrow), 100):  # Redis loads them from Postgres
                await stubs[0].GetAvailability(api.GetAvailabilityRequest(
                    skus=(net.wide + net.narrow)[i:i + 100]), timeout=60)
            setup["redis"] = await redis_memory(probe.redis, net, mem0)
            phases = Phases(o, chans, probe, net)
            await phases.idle(5.0)
            await phases.writes()
            await phases.reads()
            setup["reconcile"] = await reconcile_pass(stack, probe)
            setup["stock_updates"] = dict(await probe.conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'stock'"))
            settings = {r["name"]: r["setting"] for r in await probe.conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                ["wal_compression", "checkpoint_timeout", "max_wal_size", "full_page_writes",
                 "fsync", "synchronous_commit", "shared_buffers", "server_version"])}
    finally:
        for c in chans:
            await c.close(None)
    return {"setup": setup, "phases": [asdict(p) for p in phases.results], "postgres": settings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    for name in ("reservations", "carts", "expiring", "hot", "routes", "reads", "concurrency",
                 "stores", "wide_skus", "narrow_skus"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--json", type=Path, help="write the figures here as well")
    args = p.parse_args(argv)
    o = Options(**{k: v for k, v in vars(args).items() if k != "json"})
    root = Path(tempfile.mkdtemp(prefix="inventory-capacity-"))
    stack = Stack(root)
    t0 = time.perf_counter()
    try:
        print("starting the stores and the service...", file=sys.stderr, flush=True)
        stack.start()
        res = asyncio.run(run(o, stack))
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(report(res, str(o), TABLES, time.perf_counter() - t0))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
