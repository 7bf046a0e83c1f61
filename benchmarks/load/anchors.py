"""Anchors measured in the same run on the same box, driven by the same generator:

- `echo`: a bare grpc.aio echo server (the Python gRPC ceiling), `benchmarks/echo_server.py`;
- `redis-evalsha`: the service's hold script (`hold.lua`) by pipelined EVALSHA on the service's Redis;
- `pg-reserve-tx`: a Postgres transaction shaped like a reservation (row lock, stock update,
  reservation + line + outbox inserts, durable COMMIT) on scratch tables in schema `bench_anchor`.

Anchor keys and rows follow the same Zipf popularity as the scenarios, over as many SKUs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from importlib import resources
from time import perf_counter
from typing import Any
from urllib.parse import urlparse

from benchmarks.load.clients import Recorder
from benchmarks.load.scenarios import Scenario
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api

ANCHOR_LOCATION = "WH-ANCHOR"
PG_SCHEMA = "bench_anchor"
_HUGE = 10**15  # Postgres bigint
# Lua prints numbers with %.14g: 1e15 would come back as "1e+15" and break the hash format.
_REDIS_ON_HAND = 10**12


def echo_payload() -> bytes:
    """A request the size of a one-line Reserve, for the echo anchor."""
    return api.ReserveRequest(
        lines=[pb.ReservationLine(sku="SKU-000001", location_id="WH-WAW", quantity=1)],
        ttl_seconds=60, channel=pb.CHANNEL_WEB, idempotency_key="bench-0-r-1-123456").SerializeToString()


def hold_script() -> str:
    lua = resources.files("inventory_svc.storage").joinpath("lua")
    return "".join(lua.joinpath(f"{n}.lua").read_text() for n in ("bump", "hold"))


def redis_keys(n: int) -> list[str]:
    return [f"bench:{{ANCHOR-{i:06d}}}" for i in range(n)]


def hold_record_key(key: str) -> str:
    return "bench-hold:" + key[key.index("{"):]


def hold_call(key: str, hold_id: str) -> list[str | int]:
    """numkeys, KEYS and ARGV of one 1-unit, one-line hold, per the layout hold.lua's header
    documents (KEYS: the stock hash and its hold records; ARGV: not POS, one line, the hold id,
    not forced, no key filter, then the line)."""
    return [2, key, hold_record_key(key), 0, 1, hold_id, 0, 0, 1, ANCHOR_LOCATION, 1]


# -------------------------------------------------------------------------------------------------
# set-up and clean-up, in the coordinator


def setup_redis_anchor(url: str, n_keys: int) -> dict[str, Any]:
    """Load hold.lua and create n stock hashes shaped like the service's (`_` marker + a location)."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        sha = r.script_load(hold_script())
        pipe = r.pipeline(transaction=False)
        for key in redis_keys(n_keys):
            # "on_hand:reserved:safety:version:seq:held", as hold.lua reads a field
            pipe.hset(key, mapping={"_": "1", ANCHOR_LOCATION: f"{_REDIS_ON_HAND}:0:0:1:1:0"})
        pipe.execute()
    finally:
        r.close()
    return {"redis_url": url, "sha": sha, "n_keys": n_keys}


def cleanup_redis_anchor(params: dict[str, Any]) -> None:
    import redis

    r = redis.Redis.from_url(params["redis_url"])
    try:
        keys = redis_keys(params["n_keys"])
        keys += [hold_record_key(k) for k in keys]
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
    finally:
        r.close()


PG_DDL = f"""
DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE;
CREATE SCHEMA {PG_SCHEMA};
CREATE TABLE {PG_SCHEMA}.stock (
    sku text NOT NULL, location_id text NOT NULL, on_hand bigint NOT NULL,
    reserved bigint NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (sku, location_id), CHECK (0 <= reserved AND reserved <= on_hand));
CREATE TABLE {PG_SCHEMA}.reservations (
    id text PRIMARY KEY, status text NOT NULL, channel text NOT NULL,
    order_ref text NOT NULL DEFAULT '', created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL, ended_at timestamptz);
CREATE INDEX ON {PG_SCHEMA}.reservations (expires_at) WHERE status = 'ACTIVE';
CREATE TABLE {PG_SCHEMA}.reservation_lines (
    reservation_id text NOT NULL REFERENCES {PG_SCHEMA}.reservations (id), sku text NOT NULL,
    location_id text NOT NULL, quantity bigint NOT NULL, requested bigint NOT NULL,
    PRIMARY KEY (reservation_id, sku, location_id));
CREATE INDEX ON {PG_SCHEMA}.reservation_lines (sku, location_id);
CREATE TABLE {PG_SCHEMA}.outbox (
    id bigserial PRIMARY KEY, kind text NOT NULL, sku text NOT NULL DEFAULT '',
    location_id text NOT NULL DEFAULT '', payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
"""


async def setup_pg_anchor(url: str, n_rows: int) -> dict[str, Any]:
    """Create the scratch schema with n stock rows."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(PG_DDL)
        await conn.execute(
            f"INSERT INTO {PG_SCHEMA}.stock (sku, location_id, on_hand)"
            " SELECT 'A-' || lpad(g::text, 6, '0'), $1, $2 FROM generate_series(0, $3 - 1) g",
            ANCHOR_LOCATION, _HUGE, n_rows)
    finally:
        await conn.close()
    return {"database_url": url, "n_rows": n_rows}


async def cleanup_pg_anchor(params: dict[str, Any]) -> None:
    import asyncpg

    conn = await asyncpg.connect(params["database_url"])
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
    finally:
        await conn.close()


# -------------------------------------------------------------------------------------------------
# the operations, in the workers


class Echo(Scenario):
    """One echo call with a Reserve-sized payload."""

    name, rpcs = "echo", ("Echo",)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        await rec.call("Echo", e.clients.echo(self.params["echo_target"]), self.params["payload"], t0)


def _resp(*args: str | int) -> bytes:
    """One command in the Redis protocol."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class RedisEvalsha(Scenario):
    """A pipeline of `redis_pipeline` EVALSHA hold.lua calls (one line, 1 unit each).

    Commands are pre-encoded and replies parsed by hiredis on raw connections, so the client costs
    little and the figure is Redis's, not redis-py's."""

    name, rpcs = "redis-evalsha", ("EVALSHA hold.lua",)

    async def setup(self) -> None:
        e, sha = self.env, self.params["sha"]
        keys = redis_keys(self.params["n_keys"])
        self.depth = e.knobs.redis_pipeline
        # Hold ids repeat across batches, so the hold-record hashes stay small.
        self.batches = [b"".join(_resp("EVALSHA", sha, *hold_call(
            keys[e.rank() % len(keys)], f"a{e.wid}-{b}-{i}")) for i in range(self.depth))
            for b in range(64)]
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        url = urlparse(self.params["redis_url"])
        reader, writer = await asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 6379)
        if url.password:  # the embedded Valkey has a generated password
            args = ("AUTH", url.username, url.password) if url.username else ("AUTH", url.password)
            writer.write(_resp(*args))
            await reader.readline()
        db = (url.path or "/0").strip("/") or "0"
        if db != "0":
            writer.write(_resp("SELECT", db))
            await reader.readline()
        return reader, writer

    async def op(self, rec: Recorder, t0: float | None) -> None:
        import hiredis

        conn = self.free.pop() if self.free else await self._connect()
        reader, writer = conn
        parser = hiredis.Reader()
        start = perf_counter() if t0 is None else t0
        code: str | None = None
        writer.write(self.env.rng.choice(self.batches))
        got = 0
        while got < self.depth:
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                got += 1
                if isinstance(reply, Exception) or int(reply[0]) != 0:
                    code = "NOT_HELD" if not isinstance(reply, Exception) else type(reply).__name__
        self.free.append(conn)
        rec.done("EVALSHA hold.lua", start, code, items=self.depth)

    async def close(self) -> None:
        for _, writer in self.free:
            writer.close()


class PgReserveTx(Scenario):
    """BEGIN; SELECT … FOR UPDATE; UPDATE reserved; INSERT reservation, line, outbox; COMMIT."""

    name, rpcs = "pg-reserve-tx", ("PG reserve tx",)

    async def setup(self) -> None:
        self.pool = await self.env.clients.pg(self.params["database_url"], self.params["pool_size"])
        self.n_rows = self.params["n_rows"]

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        sku = f"A-{e.rank() % self.n_rows:06d}"
        rid = f"a{secrets.token_hex(10)}"
        payload = json.dumps({"reservation_id": rid, "status": "ACTIVE", "order_ref": ""})
        start = perf_counter() if t0 is None else t0
        code: str | None = None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(
                    f"SELECT on_hand, reserved, version FROM {PG_SCHEMA}.stock"
                    " WHERE sku = $1 AND location_id = $2 FOR UPDATE", sku, ANCHOR_LOCATION)
                await conn.execute(
                    f"UPDATE {PG_SCHEMA}.stock SET reserved = reserved + 1, version = version + 1"
                    " WHERE sku = $1 AND location_id = $2", sku, ANCHOR_LOCATION)
                await conn.execute(
                    f"INSERT INTO {PG_SCHEMA}.reservations (id, status, channel, expires_at)"
                    " VALUES ($1, 'ACTIVE', 'WEB', now() + interval '15 minutes')", rid)
                await conn.execute(
                    f"INSERT INTO {PG_SCHEMA}.reservation_lines VALUES ($1, $2, $3, 1, 1)",
                    rid, sku, ANCHOR_LOCATION)
                await conn.execute(
                    f"INSERT INTO {PG_SCHEMA}.outbox (kind, payload) VALUES ('RESERVATION', $1::jsonb)",
                    payload)
        except Exception as exc:  # a database error is an outcome to count, not a crash
            code = type(exc).__name__
        rec.done("PG reserve tx", start, code)


ANCHOR_SCENARIOS: dict[str, type[Scenario]] = {c.name: c for c in (Echo, RedisEvalsha, PgReserveTx)}
