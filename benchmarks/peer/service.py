"""The peer's calls: raw request bytes in, answer bytes out (a DomainError for a refusal).

Bytes both ways because a keyed call stores its answer's bytes anyway: they are built once, go
into the idempotency row, and are sent as they are; a repeat is answered with the stored bytes
untouched. The fingerprint of a request is the SHA-256 of the method and the bytes received.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg

from benchmarks.peer import sql
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory_svc.domain.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InsufficientStock,
    NotFound,
    Shortfall,
)
from inventory_svc.domain.model import Channel
from inventory_svc.domain.validation import (
    Violations,
    check_count,
    check_idempotency_key,
    validate_lines,
    validate_ttl,
)
from inventory_svc.transport import convert as cv

log = logging.getLogger(__name__)
T = TypeVar("T")

# our service's defaults (inventory_svc/config.py), so both refuse and default alike
DEFAULT_TTL_S, MIN_TTL_S, MAX_TTL_S = 900, 1, 86_400
MAX_LINES, MAX_SKUS_PER_READ = 200, 1_000
SWEEP_BATCH = 200

_STATUS_PB = {s: pb.ReservationStatus.Value(f"RESERVATION_STATUS_{s}")
              for s in ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED")}
_CHANNEL_PB = {c.value: pb.Channel.Value(f"CHANNEL_{c.value}") for c in Channel}
_SALE = pb.MovementKind.Value("MOVEMENT_KIND_SALE")


def _hex(data: bytes) -> str:
    """A bytea literal of the simple query protocol: hex digits only, so nothing to escape."""
    return f"'\\x{data.hex()}'::bytea"


def _replay_or_refuse(key: str, method: str, fingerprint: bytes, row: Any) -> bytes:
    """A stored answer for the key: the same request gets its bytes, another is refused."""
    if row["method"] != method or bytes(row["request_hash"]) != fingerprint:
        raise AlreadyExists(f"idempotency_key {key!r} was already used for a different request"
                            f" ({row['method']})")
    return bytes(row["response"])


class Conn:
    """A pooled connection with its hot statements prepared once."""

    __slots__ = ("conn", "st")

    def __init__(self, conn: asyncpg.Connection, statements: dict[str, Any]) -> None:
        self.conn = conn
        self.st = statements


class Pool:
    """A fixed set of connections: a free list and a queue of waiters, nothing per call beyond
    that (asyncpg's pool resets each connection on release with one more round trip)."""

    def __init__(self, connect: Callable[[], Awaitable[Conn]], size: int) -> None:
        self._connect = connect
        self.size = size
        self._free: list[Conn] = []
        self._waiters: deque[asyncio.Future[Conn]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def fill(self) -> None:
        self._free.extend(await asyncio.gather(*(self._connect() for _ in range(self.size))))

    async def get(self) -> Conn:
        if self._free:
            return self._free.pop()  # the most recently used: its backend is warm
        fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.put(fut.result())
            raise

    def put(self, c: Conn) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(c)
                return
        self._free.append(c)

    def drop(self, c: Conn) -> None:
        """A connection in an unknown state (a call cancelled mid-statement, a broken socket):
        close it and open another in its place."""
        c.conn.terminate()
        if not self._closed:
            task = asyncio.create_task(self._replace())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replace(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                self.put(await self._connect())
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reconnecting to postgres: %r", exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for c in self._free:
            with contextlib.suppress(Exception):
                await c.conn.close(timeout=5)
        self._free.clear()


class Peer:
    """The Postgres-only inventory: every call a statement or a short transaction."""

    HOT = {"one": (sql.RESERVE_ONE, sql.RESERVE_ONE_OUTBOX),
           "many": (sql.RESERVE_MANY, sql.RESERVE_MANY_OUTBOX),
           "settle": (sql.SETTLE, sql.SETTLE_OUTBOX),
           "idem": (sql.IDEMPOTENCY_ROW, ""), "avail": (sql.AVAILABILITY, ""),
           "avail_at": (sql.AVAILABILITY_AT, ""), "res": (sql.RESERVATION, "")}

    def __init__(self, database_url: str, *, pool_size: int = 16, outbox: bool = False) -> None:
        self.database_url = database_url
        self.outbox = outbox
        self.pool = Pool(self._connect, pool_size)

    async def _connect(self) -> Conn:
        conn = await asyncpg.connect(self.database_url, statement_cache_size=64)
        st = {name: await conn.prepare(sql.with_outbox(text, cte, self.outbox))
              for name, (text, cte) in self.HOT.items()}
        return Conn(conn, st)

    async def start(self) -> None:
        await self.pool.fill()

    async def close(self) -> None:
        await self.pool.close()

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run fn on a pooled connection. After a refusal or a statement the server refused,
        the connection is idle (out of any transaction) and goes back; after anything else (a
        call cancelled mid-statement, a broken socket) its state is in doubt: it is replaced."""
        c = await self.pool.get()
        try:
            out = await fn(c)
        except (DomainError, asyncpg.PostgresError):
            try:
                if c.conn.is_in_transaction():
                    await c.conn.execute("ROLLBACK")
            except BaseException:
                self.pool.drop(c)
                raise
            self.pool.put(c)
            raise
        except BaseException:
            self.pool.drop(c)
            raise
        self.pool.put(c)
        return out

    # ---- Reserve -------------------------------------------------------------------------------
    async def reserve(self, raw: bytes) -> bytes:
        req = api.ReserveRequest.FromString(raw)
        v = Violations()
        validate_lines(v, "lines", req.lines, MAX_LINES)  # type: ignore[arg-type]
        validate_ttl(v, "ttl_seconds", req.ttl_seconds, MIN_TTL_S, MAX_TTL_S)
        v.text("order_ref", req.order_ref)
        check_idempotency_key(v, req.idempotency_key)
        v.raise_if_any()
        channel = cv.channel(req.channel)
        key = req.idempotency_key or None
        fingerprint = hashlib.sha256(b"Reserve\0" + raw).digest() if key else b""
        lines = sorted(req.lines, key=lambda x: (x.sku, x.location_id))
        now_ms = int(time.time() * 1000)
        expires_ms = now_ms + (req.ttl_seconds or DEFAULT_TTL_S) * 1000
        res_id = f"r{now_ms:011x}{secrets.token_hex(8)}"
        answer = api.ReserveResponse()
        r = answer.reservation
        r.id, r.status, r.channel, r.order_ref = (res_id, _STATUS_PB["ACTIVE"],
                                                  _CHANNEL_PB[channel.value], req.order_ref)
        r.created_at_unix_ms, r.expires_at_unix_ms = now_ms, expires_ms
        for x in lines:
            r.lines.add(sku=x.sku, location_id=x.location_id, quantity=x.quantity)
        body = answer.SerializeToString()
        args = (channel is Channel.POS, res_id, channel.value, req.order_ref, float(now_ms),
                float(expires_ms), key, fingerprint, body if key else None)

        async def run(c: Conn) -> bytes:
            if len(lines) == 1:
                x = lines[0]
                row = await c.st["one"].fetchrow(x.sku, x.location_id, x.quantity, *args)
                if row["took"]:
                    return body
                if row["method"] is not None:
                    assert key is not None
                    return _replay_or_refuse(key, "Reserve", fingerprint, row)
                raise _refusal([(x, row)], channel)
            rows = await c.st["many"].fetch([x.sku for x in lines],
                                            [x.location_id for x in lines],
                                            [x.quantity for x in lines], *args)
            if rows[0]["ok"]:
                assert rows[0]["taken"] == len(lines), rows[0]["taken"]
                return body
            if rows[0]["method"] is not None:
                assert key is not None
                return _replay_or_refuse(key, "Reserve", fingerprint, rows[0])
            seen = {(w["sku"], w["location_id"]): w for w in rows if w["sku"] is not None}
            raise _refusal([(x, seen.get((x.sku, x.location_id))) for x in lines], channel)

        try:
            return await self._run(run)
        except asyncpg.UniqueViolationError as exc:
            if key is None or "idempotency" not in str(exc.constraint_name or ""):
                raise
            # a call with this key committed while ours ran (ours waited on its key, then was
            # refused): answer as a repeat
            return await self._stored(key, "Reserve", fingerprint)

    async def _stored(self, key: str, method: str, fingerprint: bytes) -> bytes:
        async def run(c: Conn) -> bytes:
            row = await c.st["idem"].fetchrow(key)
            if row is None:
                raise Aborted(f"a call with idempotency_key {key!r} is still running; retry")
            return _replay_or_refuse(key, method, fingerprint, row)
        return await self._run(run)

    # ---- Commit / Release ----------------------------------------------------------------------
    async def commit(self, raw: bytes) -> bytes:
        req = api.CommitReservationRequest.FromString(raw)
        return await self._settle(raw, req.reservation_id, req.idempotency_key, commit=True)

    async def release(self, raw: bytes) -> bytes:
        req = api.ReleaseReservationRequest.FromString(raw)
        if req.lines:
            # the scenarios release whole reservations; a partial release would make lines
            # mutable, which SETTLE's snapshot read of them relies on not happening
            raise FailedPrecondition("the peer releases whole reservations only",
                                     violation_type="UNSUPPORTED", subject="lines")
        return await self._settle(raw, req.reservation_id, req.idempotency_key, commit=False)

    async def _settle(self, raw: bytes, res_id: str, key_text: str, *, commit: bool) -> bytes:
        v = Violations()
        if not res_id or len(res_id) > 64 or "\x00" in res_id:
            v.add("reservation_id", f"{res_id!r} must be 1-64 characters, no NUL")
        check_idempotency_key(v, key_text)
        v.raise_if_any()
        method = "CommitReservation" if commit else "ReleaseReservation"
        key = key_text or None
        fingerprint = hashlib.sha256(method.encode() + b"\0" + raw).digest() if key else b""
        status = "COMMITTED" if commit else "RELEASED"

        async def run(c: Conn) -> bytes:
            # Keyless: the statement is its own transaction. Keyed: the answer's bytes (ledger
            # ids, times) exist only after the statement, so they are stored in the same
            # transaction, with the COMMIT in the same round trip (simple protocol, hex literals).
            if key:
                await c.conn.execute("BEGIN")
            rows = await c.st["settle"].fetch(res_id, key, commit, status)
            head = rows[0]
            if not head["ok"]:
                if key:
                    await c.conn.execute("ROLLBACK")
                if head["method"] is not None:
                    assert key is not None
                    return _replay_or_refuse(key, method, fingerprint, head)
                if head["status"] is None:
                    raise NotFound("reservation", res_id)
                if head["status"] != "ACTIVE":
                    if key and (row := await c.st["idem"].fetchrow(key)) is not None:
                        return _replay_or_refuse(key, method, fingerprint, row)  # a twin won
                    raise FailedPrecondition(
                        f"reservation {res_id!r} is {head['status']}, not ACTIVE",
                        violation_type="RESERVATION_NOT_ACTIVE", subject=res_id)
                raise FailedPrecondition(f"reservation {res_id!r} has expired",
                                         violation_type="RESERVATION_EXPIRED", subject=res_id)
            res = pb.Reservation(
                id=res_id, status=_STATUS_PB[status], channel=_CHANNEL_PB[head["channel"]],
                order_ref=head["order_ref"], created_at_unix_ms=head["created_ms"],
                expires_at_unix_ms=head["expires_ms"], ended_at_unix_ms=head["ended_ms"])
            for w in rows:
                res.lines.add(sku=w["sku"], location_id=w["location_id"], quantity=w["quantity"])
            if commit:
                answer: Any = api.CommitReservationResponse(reservation=res)
                for w in rows:
                    if w["m_id"] is not None:
                        answer.movements.add(
                            id=w["m_id"], sku=w["sku"], location_id=w["location_id"],
                            delta=-w["quantity"], kind=_SALE, reason="commit",
                            on_hand_after=w["on_hand_after"], reservation_id=res_id,
                            order_ref=head["order_ref"], created_at_unix_ms=w["m_created"])
            else:
                answer = api.ReleaseReservationResponse(reservation=res)
            body: bytes = answer.SerializeToString()
            if key:
                await c.conn.execute(
                    "INSERT INTO idempotency (key, method, request_hash, response) VALUES ("
                    f"convert_from({_hex(key.encode())}, 'UTF8'), '{method}', "
                    f"{_hex(fingerprint)}, {_hex(body)}); COMMIT")
            return body

        try:
            return await self._run(run)
        except asyncpg.UniqueViolationError as exc:
            if key is None or "idempotency" not in str(exc.constraint_name or ""):
                raise
            return await self._stored(key, method, fingerprint)

    # ---- reads ---------------------------------------------------------------------------------
    async def get_availability(self, raw: bytes) -> bytes:
        req = api.GetAvailabilityRequest.FromString(raw)
        skus, locs = list(req.skus), list(req.location_ids)
        v = Violations()
        if not skus:
            v.add("skus", "at least one sku is required")
        check_count("skus", len(skus), MAX_SKUS_PER_READ)
        for i, s in enumerate(skus):
            v.sku(f"skus[{i}]", s)
        for i, loc in enumerate(locs):
            v.location_id(f"location_ids[{i}]", loc)
        v.raise_if_any()
        pos = cv.channel(req.channel) is Channel.POS

        async def run(c: Conn) -> bytes:
            rows = await (c.st["avail_at"].fetch(skus, locs) if locs
                          else c.st["avail"].fetch(skus))
            by_sku: dict[str, list[Any]] = {}
            for w in rows:
                by_sku.setdefault(w["sku"], []).append(w)
            out = api.GetAvailabilityResponse()
            for sku in skus:
                item = out.items.add(sku=sku)
                on_hand = reserved = available = 0
                for w in by_sku.get(sku, ()):
                    free = max(0, w["on_hand"] - w["reserved"] - (0 if pos else w["safety"]))
                    item.levels.add(sku=sku, location_id=w["location_id"], on_hand=w["on_hand"],
                                    reserved=w["reserved"], safety_stock=w["safety"],
                                    available=free, version=w["version"])
                    on_hand += w["on_hand"]
                    reserved += w["reserved"]
                    available += free
                item.total_on_hand, item.total_reserved = on_hand, reserved
                item.total_available = available
            return out.SerializeToString()
        return await self._run(run)

    async def get_reservation(self, raw: bytes) -> bytes:
        req = api.GetReservationRequest.FromString(raw)
        res_id = req.reservation_id

        async def run(c: Conn) -> bytes:
            rows = await c.st["res"].fetch(res_id)
            if not rows:
                raise NotFound("reservation", res_id)
            h = rows[0]
            res = pb.Reservation(
                id=res_id, status=_STATUS_PB[h["status"]], channel=_CHANNEL_PB[h["channel"]],
                order_ref=h["order_ref"], created_at_unix_ms=h["created_ms"],
                expires_at_unix_ms=h["expires_ms"], ended_at_unix_ms=h["ended_ms"])
            for w in rows:
                res.lines.add(sku=w["sku"], location_id=w["location_id"], quantity=w["quantity"])
            return api.GetReservationResponse(reservation=res).SerializeToString()
        return await self._run(run)

    # ---- the sweeper ---------------------------------------------------------------------------
    async def expire_due(self, batch: int = SWEEP_BATCH) -> int:
        """One batch of due reservations expired, their units given back; how many."""
        async def run(c: Conn) -> int:
            async with c.conn.transaction():
                ids = [w["id"] for w in await c.conn.fetch(sql.EXPIRE_DUE, batch)]
                if ids:
                    await c.conn.execute(sql.UNRESERVE, ids)
            return len(ids)
        return await self._run(run)

    async def sweep_forever(self, interval_s: float) -> None:
        while True:
            try:
                while await self.expire_due() == SWEEP_BATCH:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed pass is retried at the next interval
                log.warning("sweep failed: %r", exc)
            await asyncio.sleep(interval_s)

    # ---- set-up calls ----------------------------------------------------------------------------
    async def _keyed(self, raw_hash: bytes, method: str, key: str,
                     work: Callable[[asyncpg.Connection], Awaitable[bytes]]) -> bytes:
        """A set-up call in one transaction, its answer stored under its key."""
        v = Violations()
        check_idempotency_key(v, key)
        v.raise_if_any()
        fingerprint = hashlib.sha256(method.encode() + b"\0" + raw_hash).digest()

        async def run(c: Conn) -> bytes:
            async with c.conn.transaction():
                if key:
                    await c.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
                    row = await c.st["idem"].fetchrow(key)
                    if row is not None:
                        return _replay_or_refuse(key, method, fingerprint, row)
                body = await work(c.conn)
                if key:
                    await c.conn.execute(sql.REMEMBER, key, method, fingerprint, body)
                return body
        return await self._run(run)

    async def upsert_locations(self, raw: bytes) -> bytes:
        req = api.UpsertLocationsRequest.FromString(raw)
        locs = [cv.location_in(m, i) for i, m in enumerate(req.locations)]

        async def work(conn: asyncpg.Connection) -> bytes:
            await conn.executemany(sql.UPSERT_LOCATION, [
                (x.id, x.name, x.type.value, x.lat, x.lon, x.can_ship, x.can_pickup, x.active,
                 x.priority, x.fixed_cost, x.cost_per_km, x.cost_per_unit, x.daily_capacity,
                 x.default_safety_stock) for x in locs])
            return api.UpsertLocationsResponse(
                locations=[cv.location_out(x) for x in locs]).SerializeToString()
        return await self._keyed(raw, "UpsertLocations", req.idempotency_key, work)

    async def list_locations(self, raw: bytes) -> bytes:
        req = api.ListLocationsRequest.FromString(raw)
        kind = cv.location_type(req.type, "type")
        ids = set(req.ids)

        async def run(c: Conn) -> bytes:
            out = api.ListLocationsResponse()
            for w in await c.conn.fetch(sql.LIST_LOCATIONS):
                if (ids and w["id"] not in ids) or (kind and w["type"] != kind.value) \
                        or (not req.include_inactive and not w["active"]):
                    continue
                out.locations.add(
                    id=w["id"], name=w["name"], type=pb.LocationType.Value(
                        f"LOCATION_TYPE_{w['type']}"), lat=w["lat"], lon=w["lon"],
                    can_ship=w["can_ship"], can_pickup=w["can_pickup"], active=w["active"],
                    priority=w["priority"], fixed_cost=w["fixed_cost"],
                    cost_per_km=w["cost_per_km"], cost_per_unit=w["cost_per_unit"],
                    daily_capacity=w["daily_capacity"],
                    default_safety_stock=w["default_safety_stock"])
            return out.SerializeToString()
        return await self._run(run)

    async def set_stock(self, raw: bytes) -> bytes:
        req = api.SetStockRequest.FromString(raw)
        v = Violations()
        v.sku("sku", req.sku)
        v.location_id("location_id", req.location_id)
        v.quantity("on_hand", req.on_hand, allow_zero=True)
        v.text("reason", req.reason)
        v.raise_if_any()
        pos = cv.channel(req.channel) is Channel.POS
        expected = req.expected_version if req.HasField("expected_version") else None

        async def work(conn: asyncpg.Connection) -> bytes:
            (level, delta), = await _write_counts(
                conn, [(req.sku, req.location_id, req.on_hand, None)], "COUNT", req.reason,
                expected_version=expected)
            return api.SetStockResponse(stock=_level(level, pos), delta=delta).SerializeToString()
        return await self._keyed(raw, "SetStock", req.idempotency_key, work)

    async def import_stock(self, messages: Sequence[bytes]) -> bytes:
        digest = hashlib.sha256()
        rows: list[tuple[str, str, int, int | None]] = []
        key = reason = ""
        for i, raw in enumerate(messages):
            msg = api.ImportStockRequest.FromString(raw)
            if i == 0:
                key, reason = msg.idempotency_key, msg.reason
            digest.update(raw)
            rows += [(r.sku, r.location_id, r.on_hand,
                      r.safety_stock if r.HasField("safety_stock") else None) for r in msg.rows]
        v = Violations()
        if not rows:
            v.add("rows", "at least one row is required")
        if len({(r[0], r[1]) for r in rows}) != len(rows):
            v.add("rows", "a sku-location is given twice")
        for i, r in enumerate(rows[:100_000]):
            v.sku(f"rows[{i}].sku", r[0])
            v.location_id(f"rows[{i}].location_id", r[1])
            v.quantity(f"rows[{i}].on_hand", r[2], allow_zero=True)
            if len(v.items) >= 20:
                break
        v.raise_if_any()

        async def work(conn: asyncpg.Connection) -> bytes:
            out = await _write_counts(conn, rows, "IMPORT", reason)
            changed = sum(1 for _, d in out if d)
            return api.ImportStockResponse(rows_received=len(rows), rows_changed=changed,
                                           skus=len({r[0] for r in rows})).SerializeToString()
        return await self._keyed(digest.digest(), "ImportStock", key, work)


def _refusal(lines: Iterable[tuple[Any, Any]], channel: Channel) -> Exception:
    """Why lines were not taken, from the rows as the statement saw them: a missing stock row,
    an inactive location, or too few units."""
    short: list[Shortfall] = []
    for x, row in lines:
        if row is None or row["on_hand"] is None:
            return NotFound("stock", f"{x.sku}@{x.location_id}")
        if not row["active"]:
            return FailedPrecondition(f"location {x.location_id!r} is not active",
                                      violation_type="LOCATION_INACTIVE", subject=x.location_id)
        buffer = 0 if channel is Channel.POS else row["safety"]
        free = max(0, row["on_hand"] - row["reserved"] - buffer)
        if free < x.quantity:
            short.append(Shortfall(x.sku, x.location_id, x.quantity, free))
    if not short:
        # A one-line call that waited for a concurrent writer reads the row as it was before
        # that writer; what it was refused on is the newer row: say "fewer than asked".
        x, _ = next(iter(lines))
        short.append(Shortfall(x.sku, x.location_id, x.quantity, x.quantity - 1))
    return InsufficientStock(tuple(short))


def _level(w: Any, pos: bool) -> pb.StockLevel:
    free = max(0, w["on_hand"] - w["reserved"] - (0 if pos else w["safety"]))
    return pb.StockLevel(sku=w["sku"], location_id=w["location_id"], on_hand=w["on_hand"],
                         reserved=w["reserved"], safety_stock=w["safety"], available=free,
                         version=w["version"])


async def _write_counts(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, int, int | None]],
                        kind: str, reason: str, *, expected_version: int | None = None,
                        ) -> list[tuple[Any, int]]:
    """Absolute counts of rows (created if missing at a known location), with their ledger
    rows: each (new level, delta)."""
    skus, locs = [r[0] for r in rows], [r[1] for r in rows]
    await conn.execute(sql.CREATE_STOCK, skus, locs)
    locked = {(w["sku"], w["location_id"]): w for w in await conn.fetch(sql.LOCK_STOCK, skus, locs)}
    for sku, loc, on_hand, _ in rows:
        w = locked.get((sku, loc))
        if w is None:
            raise NotFound("location", loc)
        if expected_version is not None and w["version"] != expected_version:
            raise Aborted(f"stock {sku}@{loc} is at version {w['version']}, "
                          f"not the expected {expected_version}")
        if on_hand < w["reserved"]:
            raise FailedPrecondition(
                f"cannot count {sku}@{loc} to {on_hand}: {w['reserved']} units are reserved",
                violation_type="BELOW_RESERVED", subject=f"{sku}@{loc}")
    new = {(w["sku"], w["location_id"]): w for w in await conn.fetch(
        sql.WRITE_COUNTS, skus, locs, [r[2] for r in rows], [r[3] is not None for r in rows],
        [r[3] or 0 for r in rows])}
    deltas = [(r, r[2] - locked[(r[0], r[1])]["on_hand"]) for r in rows]
    moved = [(r, d) for r, d in deltas if d]
    if moved:
        await conn.execute(sql.ADD_MOVEMENTS, [r[0] for r, _ in moved], [r[1] for r, _ in moved],
                           [d for _, d in moved], [kind] * len(moved), [reason] * len(moved),
                           [r[2] for r, _ in moved])
    return [(new[(r[0], r[1])], d) for r, d in deltas]
