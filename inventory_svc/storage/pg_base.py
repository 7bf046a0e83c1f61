"""Postgres plumbing: the pool, migrations, error translation and idempotent units of work."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg

from inventory_svc.domain.errors import Aborted, AlreadyExists, DomainError, Unavailable
from inventory_svc.storage.coalesce import Coalescer
from inventory_svc.storage.pg_watch import SequencerWake

log = logging.getLogger(__name__)

# Any of these means Postgres could not be reached or the connection broke mid-call.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
MIGRATION_LOCK_ID = 0x1F0E_7A11  # one fixed advisory lock: replicas starting at once migrate in turn


@dataclass(frozen=True, slots=True)
class Idem:
    """An idempotent call: its key, what it was, and how its answer is stored (DESIGN I6)."""

    key: str
    method: str
    fingerprint: bytes
    encode: Callable[[Any], bytes]

    @staticmethod
    def fingerprint_of(method: str, request: bytes) -> bytes:
        return hashlib.sha256(method.encode() + b"\0" + request).digest()


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored answer of an earlier call with the same idempotency key and request."""

    payload: bytes


def idempotency_row(idem: Idem | None, result: Any) -> tuple[str | None, str, bytes, bytes]:
    """The idempotency row of a call's `result`, for a statement that inserts it itself (key
    None: the call has no key)."""
    if idem is None:
        return None, "", b"", b""
    return idem.key, idem.method, idem.fingerprint, idem.encode(result)


class PgClock:
    """Postgres' clock as this process last saw it (a transaction's `now()`), run on by the
    process's monotonic clock: the time a statement that must carry its timestamps in its
    parameters (app/group_commit's one-statement groups) stamps rows with. Its error is about
    a round trip, as a transaction's own `now()` (taken at BEGIN) is."""

    def __init__(self) -> None:
        self._seen: tuple[int, float] | None = None  # (Postgres ms, monotonic s) of a reading

    def saw(self, now: datetime) -> None:
        self._seen = (to_ms(now), time.monotonic())

    def now_ms(self) -> int | None:
        """Postgres' time now in ms, None before the first reading."""
        if self._seen is None:
            return None
        at_ms, at = self._seen
        return at_ms + int((time.monotonic() - at) * 1000)


def to_ms(ts: datetime | None) -> int:
    return 0 if ts is None else int(ts.timestamp() * 1000)


def advisory_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


@contextlib.contextmanager
def translate_errors() -> Any:
    """Connection trouble becomes UNAVAILABLE; lock conflicts become ABORTED (retry whole)."""
    try:
        yield
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
        raise Aborted(f"concurrent conflict, retry the call: {exc}") from exc
    except asyncpg.CheckViolationError as exc:
        # the final arbiter (0 <= reserved <= on_hand) refused what a concurrent change made
        # stale: nothing was written, the client may retry whole (never INTERNAL)
        raise Aborted(f"stock changed concurrently, retry the call: {exc}") from exc
    except asyncpg.QueryCanceledError as exc:
        raise Unavailable(f"postgres statement timed out: {exc}") from exc
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"postgres unavailable: {exc!r}") from exc


class Unit:
    """One transaction of a mutating call, with its idempotency record."""

    def __init__(self, conn: asyncpg.Connection, idem: Idem | None) -> None:
        self.conn = conn
        self.idem = idem
        self.replay: bytes | None = None

    async def claim(self) -> None:
        if self.idem is None:
            return
        # One round trip for the lock and the lookup. The lookup's snapshot is taken as the
        # statement starts, so a first call committing in that instant can be missed; the
        # idempotency primary key then refuses our record at commit, and the repeat is
        # answered ABORTED (retry), never run twice.
        (found,) = await look_up_keys(self.conn, [self.idem])
        if isinstance(found, DomainError):
            raise found
        self.replay = found

    async def remember(self, result: Any) -> None:
        if self.idem is None:
            return
        payload = self.idem.encode(result)
        try:
            await self.conn.execute(
                "INSERT INTO idempotency (key, method, request_hash, response)"
                " VALUES ($1, $2, $3, $4)",
                self.idem.key,
                self.idem.method,
                self.idem.fingerprint,
                payload,
            )
        except asyncpg.UniqueViolationError as exc:  # only on an advisory-lock hash collision
            raise Aborted(f"idempotency_key {self.idem.key!r} is busy; retry") from exc


async def look_up_keys(
    conn: asyncpg.Connection, idems: Sequence[Idem]
) -> list[bytes | DomainError | None]:
    """Try each key's lock and look its answer up, in one statement: per call, the answer to
    replay, the error to answer, or None for a key never used (and now locked, until the
    transaction ends: at once, outside one)."""
    rows = await conn.fetch(
        "SELECT pg_try_advisory_xact_lock(k.lock) AS locked, i.method, i.request_hash,"
        " i.response FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS k(key, lock, n)"
        " LEFT JOIN idempotency i ON i.key = k.key ORDER BY k.n",
        [x.key for x in idems], [advisory_key(x.key) for x in idems],
    )
    return [_claimed(idem, r["locked"], r) for idem, r in zip(idems, rows, strict=True)]


async def keys_page(conn: asyncpg.Connection, methods: list[str], window_s: float, after: str,
                    limit: int) -> list[tuple[str, float]]:
    """Idempotency keys of `methods` younger than the window, after `after` in key order, with
    when each was stored (Unix seconds): a page of what the key filter must hold."""
    rows = await conn.fetch(
        "SELECT key, extract(epoch FROM created_at)::float8 AS at FROM idempotency"
        " WHERE key > $3 AND method = ANY($1::text[])"
        "  AND created_at > now() - make_interval(secs => $2)"
        " ORDER BY key LIMIT $4", methods, window_s, after, limit)
    return [(r["key"], r["at"]) for r in rows]


async def claim_keys(
    conn: asyncpg.Connection, idems: Sequence[Idem]
) -> list[bytes | DomainError | None]:
    """`Unit.claim` for many calls in one transaction (their keys distinct): per call, the
    answer to replay, the error to answer, or None for a key that is now ours.

    Two statements, so the lookup's snapshot is taken after the locks are held: a first call
    that committed while we waited for nothing (the locks are tried, never waited for) is seen,
    and no insert of ours can then collide with it and fail the whole group. A caller with a
    statement of its own to send next can carry the lookup in it instead (`lock_keys`, then
    `answers_of`)."""
    locked = await lock_keys(conn, idems)
    ours = [x.key for x, got in zip(idems, locked, strict=True) if got]
    stored = {
        r["key"]: r
        for r in await conn.fetch(
            "SELECT key, method, request_hash, response FROM idempotency"
            " WHERE key = ANY($1::text[])", ours)
    } if ours else {}
    return answers_of(idems, locked, stored)


async def lock_keys(conn: asyncpg.Connection, idems: Sequence[Idem]) -> list[bool]:
    """Try each key's transaction-scoped advisory lock (never waited for): True where taken."""
    rows = await conn.fetch(
        "SELECT pg_try_advisory_xact_lock(k) AS locked"
        " FROM unnest($1::bigint[]) WITH ORDINALITY AS t(k, i) ORDER BY i",
        [advisory_key(x.key) for x in idems],
    )
    return [bool(r["locked"]) for r in rows]


def answers_of(idems: Sequence[Idem], locked: Sequence[bool], stored: Mapping[str, Any]
               ) -> list[bytes | DomainError | None]:
    """Per call, from its key's lock and its stored row (by key: a record with method,
    request_hash and response), what `claim_keys` returns. The rows must have been read by a
    statement that began after the locks were taken."""
    return [_claimed(idem, got, stored.get(idem.key))
            for idem, got in zip(idems, locked, strict=True)]


@dataclass(frozen=True, slots=True)
class GroupKeys:
    """The keys of a group commit's calls, locked; their lookup rides in the group's next
    statement (`to_look_up`), and `answers` reads what it found."""

    idems: tuple[Idem | None, ...]  # per call of the group; None: no key
    locked: tuple[bool, ...]  # per keyed call, in order

    @property
    def to_look_up(self) -> list[str]:
        keyed = [x for x in self.idems if x is not None]
        return [x.key for x, got in zip(keyed, self.locked, strict=True) if got]

    def answers(self, stored: Mapping[str, Any]) -> list[Any]:
        """Per call: the Replay of its first answer, the error to answer, or None (to
        decide)."""
        keyed = [x for x in self.idems if x is not None]
        claims = iter(answers_of(keyed, self.locked, stored))
        out: list[Any] = []
        for idem in self.idems:
            claim = next(claims) if idem is not None else None
            out.append(Replay(claim) if isinstance(claim, bytes) else claim)
        return out


async def lock_group_keys(conn: asyncpg.Connection, idems: Sequence[Idem | None]) -> GroupKeys:
    """Lock the keys of a group's calls (one statement, none if no call has a key)."""
    keyed = [x for x in idems if x is not None]
    return GroupKeys(tuple(idems), tuple(await lock_keys(conn, keyed) if keyed else ()))


def _claimed(idem: Idem, locked: bool, row: asyncpg.Record | None
             ) -> bytes | DomainError | None:
    """What a key's lock and stored row mean for a call: the answer to replay, the error to
    answer, or None for a key never used."""
    if not locked:
        return Aborted(f"a call with idempotency_key {idem.key!r} is still running;"
                       " retry it later")
    if row is None or row["method"] is None:
        return None
    if row["method"] != idem.method or bytes(row["request_hash"]) != idem.fingerprint:
        return AlreadyExists(f"idempotency_key {idem.key!r} was already used for a different"
                             f" request ({row['method']})",
                             metadata={"first_method": str(row["method"])})
    return bytes(row["response"])


async def _leave_session_as_is(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to do. asyncpg's default sends one more query with
    every release (unlock advisory locks, close cursors, unlisten, reset settings), a round trip
    and a transaction per request; this service leaves none of those behind on a pooled
    connection (advisory locks are transaction-scoped, settings are SET LOCAL). asyncpg still
    rolls back a transaction left open."""


async def _pool(dsn: str, plan_cache_mode: str, min_size: int, max_size: int,
                timeout_s: float) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        server_settings={"plan_cache_mode": plan_cache_mode},
        min_size=min_size,
        max_size=max_size,
        command_timeout=timeout_s,
        timeout=timeout_s,
        reset=_leave_session_as_is,
    )


class PgBase:
    def __init__(self, pool: asyncpg.Pool, timeout_s: float | None = None,
                 group_pool: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        # the group committers' connections (see connect); the one pool when there are none
        self.group_pool = group_pool or pool
        self.timeout_s = timeout_s  # also bounds waiting for a pooled connection
        self._lookups: Coalescer[Idem, bytes | None] = Coalescer(self._look_up)
        self.clock = PgClock()
        # Told by `committed`, on the serving loop after every write, so both must be cheap:
        # the WatchStock sequencer's wake-up when it runs in this process (app/sequencer.py),
        # else that of another process's (off until its `after_s` is set)
        self.on_commit: Callable[[], None] | None = None
        self.wake_others = SequencerWake(pool)

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int, max_size: int, timeout_s: float,
                      group_size: int = 0) -> Any:
        """Pools of `max_size` connections in all: `group_size` of them (if any) for the group
        committers, the rest for everything else."""
        with translate_errors():
            # Our statements take arrays of any length (1 key or 100k). A generic plan cached
            # from small calls can go quadratic on a bulk call, so always plan for the input.
            pool = await _pool(dsn, "force_custom_plan", min(min_size, max_size - group_size),
                               max_size - group_size, timeout_s)
            # A group's statements are bounded by its size (group_commit_max calls), and they
            # are the hot path: planned anew each time, planning was ~40 % of the one-statement
            # group's Postgres time, and the foreign-key checks its inserts fire were planned
            # each time too (benchmarks/RESULTS.md). These connections keep one plan per
            # statement. Forced, not "auto": auto weighs the plan for any array length (Postgres
            # guesses 10 elements) against plans for the arrays at hand, and once an index
            # lookup costs more (~40k stock rows did it) it planned every group again, for good.
            # The kept plans are index lookups for any size, and Postgres plans again whenever
            # ANALYZE changes a table's statistics.
            group = None if group_size <= 0 else await _pool(
                dsn, "force_generic_plan", 1, group_size, timeout_s)
        return cls(pool, timeout_s, group)

    async def close(self) -> None:
        await self.wake_others.close()
        await self.pool.close()
        if self.group_pool is not self.pool:
            await self.group_pool.close()

    def committed(self) -> None:
        """A write of this process committed: it may have changed stock, so an idle WatchStock
        sequencer is woken (this process's, or another's). Every `unit` tells it; a write
        without one tells it itself."""
        (self.on_commit or self.wake_others)()

    def _pool_of(self, group: bool) -> asyncpg.Pool:
        return self.group_pool if group else self.pool

    @contextlib.asynccontextmanager
    async def connection(self, *, group: bool = False, in_deadline: bool = False
                         ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, no transaction: each statement commits on its own. `group`:
        one of the group committers' (plans cached; statements of bounded size only).
        `in_deadline`: the caller's own asyncio timeout bounds the wait for it, so the pool's
        is not set (on Python 3.11 asyncpg enforces it with a task of its own a call)."""
        with translate_errors():
            async with self._pool_of(group).acquire(
                    timeout=None if in_deadline else self.timeout_s) as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def unit(self, idem: Idem | None, *, group: bool = False, quiet: bool = False,
                   in_deadline: bool = False) -> AsyncIterator[Unit]:
        """A transaction that commits on success; `unit.replay` is set for a repeated call.
        `group`, `in_deadline`: as for `connection`. Its commit is `committed` unless `quiet`
        (a unit that often writes nothing, and tells `committed` itself when it did)."""
        with translate_errors():
            async with self._pool_of(group).acquire(
                    timeout=None if in_deadline else self.timeout_s) as conn, \
                    conn.transaction():
                unit = Unit(conn, idem)
                await unit.claim()
                yield unit
        if not quiet:
            self.committed()

    async def replay_of(self, idem: Idem) -> bytes | None:
        """What `Unit.claim` would find, without a transaction (the advisory lock is taken and
        let go within the statement): the first answer to replay, or None for an unused key;
        ABORTED while a call with the key runs, ALREADY_EXISTS for a different request. The
        lookups of one turn of the event loop (a flash sale's many losers) share a statement."""
        with translate_errors():
            return await self._lookups.run(idem)

    @property
    def lookup_statements(self) -> int:
        """Statements `replay_of` has sent (one for all the lookups of a turn)."""
        return self._lookups.sends

    async def _look_up(self, idems: list[Idem]) -> list[bytes | BaseException | None]:
        async with self.connection() as conn:
            return list(await look_up_keys(conn, idems))

    async def migrate(self) -> list[str]:
        """Apply the packaged migrations not yet applied; safe when N replicas start at once."""
        files = sorted(
            (f for f in resources.files("inventory_svc.storage").joinpath("migrations").iterdir()
             if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        applied: list[str] = []
        with translate_errors():
            # One transaction, its lock released with it (pooled connections keep no session
            # state: see _leave_session_as_is): all pending migrations apply, or none.
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
                for f in files:
                    if f.name in done:
                        continue
                    await conn.execute(f.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", f.name)
                    applied.append(f.name)
            for name in applied:
                log.info("applied migration %s", name)
        return applied

    async def generation(self) -> str:
        with translate_errors():
            value = await self.pool.fetchval("SELECT value FROM meta WHERE key = 'generation'")
        return str(value)
