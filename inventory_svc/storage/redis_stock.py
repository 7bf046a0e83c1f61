"""Redis: the atomic gate for holds and the read model of stock (DESIGN.md §2).

The keys and the values' encoding are in storage/redis_layout.py.

The same code runs on one server and on a Redis Cluster. On a cluster every script's keys are of
one SKU or of SKUs of one slot, calls of several slots go as one pipeline that the cluster client
splits by node (following MOVED/ASK), and whatever a cluster says while a shard fails over or a
slot moves (CLUSTERDOWN, TRYAGAIN, READONLY, a node gone) is UNAVAILABLE, as a lost server is. On
one server a call's SKUs all go in one script, whatever their slots.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from inventory_svc.domain.errors import InsufficientStock, NotFound, Shortfall, Unavailable
from inventory_svc.domain.model import Line, StockLevel
from inventory_svc.storage.redis_keys import META_KEY, KeyFilter, KeyProbe, text_of
from inventory_svc.storage.redis_layout import (
    Cached,
    HoldRecord,
    decode_cached,
    decode_hold,
    encode_committed,
    hold_key,
    stock_key,
)
from inventory_svc.storage.redis_mux import RedisMux
from inventory_svc.storage.redis_reads import HashReader
from inventory_svc.storage.script_pipe import ScriptCall, ScriptPipe

log = logging.getLogger(__name__)
REDIS_ERRORS = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
    # a cluster failing over, or moving a slot: retry, nothing was confirmed
    redis.exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN, redirections without end
    redis.exceptions.TryAgainError,  # a multi-key script while its slot is half migrated
    redis.exceptions.AskError,  # and MovedError: left after the client's own redirections
    redis.exceptions.ReadOnlyError,  # a write to a master that has just become a replica
    redis.exceptions.RedisClusterException,  # no node owns the slot (SlotNotCoveredError), ...
)
Hydrator = Callable[[list[str]], Awaitable[None]]
# How long a hold waits, step by step, for holds in flight that are in its way (hold.lua's {4})
# before it leaves the decision to Postgres: ~30 ms, several commits' time under load.
IN_FLIGHT_WAITS_S = (0.001, 0.002, 0.004, 0.008, 0.016)
Client = aioredis.Redis | RedisCluster


def _rows(levels: Iterable[StockLevel], index: dict[str, int]) -> list[Any]:
    """Committed levels as the script arguments apply.lua and settle.lua take."""
    args: list[Any] = []
    for lv in levels:
        args += [index[stock_key(lv.sku)], lv.location_id, lv.on_hand, lv.reserved,
                 lv.safety_stock, lv.version, lv.seq]
    return args


T = TypeVar("T")


def _slot(sku: str) -> int:
    return key_slot(stock_key(sku).encode())


def _script(name: str, *, uses: Sequence[str] = ()) -> str:
    """A Lua script, with the shared functions it `uses` (lua/<name>.lua) put in front."""
    lua = resources.files("inventory_svc.storage").joinpath("lua")
    return "".join(lua.joinpath(f"{n}.lua").read_text() for n in (*uses, name))


@dataclass(frozen=True, slots=True)
class Hold:
    """Units this call holds in Redis, to be given back if Postgres does not commit them."""

    lines: tuple[Line, ...]
    id: str = ""


class RedisStock:
    def __init__(self, client: Client, mux: RedisMux | None = None) -> None:
        self.client = client
        # the hot path's scripts and reads, on one server over plain TCP (redis_mux.py)
        self.mux = mux
        self._hold = client.register_script(_script("hold", uses=["bump"]))
        self._apply = client.register_script(_script("apply", uses=["bump", "take"]))
        self._hydrate = client.register_script(_script("hydrate"))
        self._repair = client.register_script(_script("repair", uses=["bump"]))
        self._inspect = client.register_script(_script("inspect"))
        self._markers = client.register_script(_script("markers"))
        self._settle = client.register_script(_script("settle", uses=["bump", "take"]))
        self._pipe = ScriptPipe(client, mux)
        self._reader = HashReader(client, mux)
        self.cluster = isinstance(client, RedisCluster)
        # which idempotency keys took stock (redis_keys.py); none on a cluster
        self.key_filter: KeyFilter | None = None
        self.dropped_stale = 0  # times a connection found (and dropped) data built elsewhere
        # INFO while the service starts (what a restart leaves behind is routine then; the
        # server sets it), WARNING while it serves (Redis restarted under us)
        self.stale_drop_level = logging.WARNING

    def _groups(self, items: Iterable[T], sku_of: Callable[[T], str]) -> list[list[T]]:
        """`items` as the scripts take them. On a cluster, grouped by their SKU's hash slot in
        ascending slot order (the order every operation over several slots takes them in, one
        script per slot). On one server a script may use keys of any slot: one group, so a
        call of five SKUs is one script (one atomic step, one command), not five."""
        if not self.cluster:
            whole = list(items)
            return [whole] if whole else []
        by_slot: dict[int, list[T]] = defaultdict(list)
        for item in items:
            by_slot[_slot(sku_of(item))].append(item)
        return [by_slot[slot] for slot in sorted(by_slot)]

    def use_key_filter(self, shape: KeyFilter | None) -> None:
        """Keep (or not) the filter of keys that took stock; never on a cluster, where a call's
        holds may run on several nodes (redis_keys.py)."""
        self.key_filter = None if self.cluster else shape

    @classmethod
    def from_url(cls, url: str, *, cluster: bool, timeout_s: float,
                 pool_max: int = 100, mux: bool = True) -> RedisStock:
        """With `mux`, the scripts and reads of calls go through one pipelined connection
        (redis_mux.py) where the URL allows it: one server over plain TCP."""
        opts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        client: Client
        if cluster:
            client = RedisCluster.from_url(url, **opts)
            return cls(client)
        # Every new connection first checks that the data was built on this very server process
        # (a Redis back from an older snapshot must serve nothing of it; see checkrun.lua).
        # Cluster nodes each have their own run id: there the generation marker alone decides.
        holder: list[RedisStock] = []

        async def on_connect(conn: Any) -> None:
            await conn.on_connect()
            if holder:
                async def run(*command: Any) -> Any:
                    await conn.send_command(*command)
                    return await conn.read_response()
                await holder[0]._check_run(run)

        async def on_mux_connect(mux: RedisMux, link: Any) -> None:
            if holder:
                await holder[0]._check_run(partial(mux.run, link))

        # A blocking pool: past `max_connections` a command waits (up to the timeout) for a
        # connection to come back. redis-py's default pool raises MaxConnectionsError instead,
        # and a burst of 200 concurrent calls on a busy box turned into UNAVAILABLE answers.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_max, timeout=timeout_s, health_check_interval=10,
            redis_connect_func=on_connect, **opts)
        client = aioredis.Redis.from_pool(pool)
        drops: set[asyncio.Task[None]] = set()

        async def disconnect_idle() -> None:
            try:
                await pool.disconnect(inuse_connections=False)
            except Exception as exc:  # closing a dead socket may fail; it is gone either way
                log.debug("redis pool: idle connections dropped with an error: %r", exc)

        def drop_idle() -> None:
            # The server closed the calls' connection: it may have gone away, and then every
            # idle connection of the pool is dead too, and would fail the first command of the
            # background work that takes it after a restart (redis-py does not send it again).
            task = asyncio.ensure_future(disconnect_idle())
            drops.add(task)
            task.add_done_callback(drops.discard)

        stock = cls(client, RedisMux.for_url(url, timeout_s=timeout_s, on_connect=on_mux_connect,
                                             on_lost=drop_idle) if mux else None)
        holder.append(stock)
        return stock

    async def _run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Scripts in one round trip, with those of concurrent calls (script_pipe)."""
        return await self._pipe.run(calls)

    async def _check_run(self, run: Callable[..., Awaitable[Any]]) -> None:
        """On a new connection (`run` sends one command on it): drop data built on another
        server process."""
        info = await run("INFO", "server")
        run_id = _info_field(info, "run_id")
        if not run_id:
            return
        if int(await run("EVAL", _script("checkrun"), 1, META_KEY, run_id)):
            self.dropped_stale += 1
            log.log(self.stale_drop_level, "redis %s holds data built on another server process "
                    "(restarted from an older snapshot?): dropped, rebuilding from postgres", run_id)

    async def run_id(self) -> str:
        """The run id of the server process ("" on a cluster: each node has its own, and the
        generation marker alone decides there; see from_url)."""
        if self.cluster:
            return ""
        with translate_redis():
            info = await self.client.execute_command("INFO", "server")
        if isinstance(info, dict):
            return str(info.get("run_id", ""))
        return _info_field(info, "run_id")

    async def close(self) -> None:
        if self.mux is not None:
            await self.mux.aclose()
        await self.client.aclose()

    # ---- holds -----------------------------------------------------------------------------
    async def hold(self, lines: Sequence[Line], *, pos: bool, hydrate: Hydrator,
                   hold_id: str = "", key: str = "") -> Hold:
        """Hold every line or none: one atomic script per hash slot, slots in ascending order
        and all in one round trip, the slots taken given back if another is short. The hold is
        recorded under `hold_id` (the reservation it is for) until `forget` or `give_back`.

        With the call's idempotency `key` and a key filter, a hold sets the key's bits, and a
        short hold whose key never took stock says so (`InsufficientStock.
        key_unused`): there is no earlier answer to replay."""
        hold_id = hold_id or "h" + secrets.token_hex(12)
        groups = self._groups(lines, lambda line: line.sku)
        # only on one server, where a call's lines are one group
        probe = self.key_filter.probe(key, time.time()) if key and self.key_filter else None
        taken: list[Line] = []
        try:
            first: list[Any] = [None]
            if len(groups) > 1:  # every slot's hold in one round trip
                # Until it answers, any of them may have been taken (on a cluster the nodes
                # answer apart: one shard may fail while the others held).
                taken = list(lines)
                with translate_redis():
                    first = await self._run_scripts([
                        (self._hold, *self._hold_call(group, pos=pos, hold_id=hold_id,
                                                      force=False)) for group in groups])
                taken = []
            shorts: list[Shortfall] = []
            for group, res in zip(groups, first, strict=True):
                if res is not None and int(res[0]) == 0:
                    taken.extend(group)
                elif res is not None and int(res[0]) == 2:
                    shorts += self._shortfalls(group, res)
            if shorts:
                raise InsufficientStock(tuple(shorts))
            # the rest (a single slot; or one to load from Postgres, or to wait on) in turn
            for group, res in zip(groups, first, strict=True):
                if res is None or int(res[0]) != 0:
                    await self._hold_slot(group, pos=pos, hydrate=hydrate, hold_id=hold_id,
                                          probe=probe)
                    taken.extend(group)
        except BaseException:
            if taken:
                try:
                    await asyncio.shield(self.give_back(Hold(tuple(taken), hold_id)))
                except Unavailable as exc:  # what is left is an orphan: the reconciler's
                    log.warning("hold %s not given back: %s", hold_id, exc.message)
            raise
        return Hold(tuple(lines), hold_id)

    async def _hold_slot(self, lines: list[Line], *, pos: bool, hydrate: Hydrator,
                         hold_id: str, probe: KeyProbe | None) -> None:
        hydrations = 0
        waits = iter(IN_FLIGHT_WAITS_S)
        force = False
        while True:
            keys, args = self._hold_call(lines, pos=pos, hold_id=hold_id, force=force,
                                         probe=probe)
            with translate_redis():
                (res,) = await self._run_scripts([(self._hold, keys, args)])
            code = int(res[0])
            if code == 0:
                return
            if code == 1:
                hydrations += 1
                if hydrations > 3:
                    raise Unavailable("redis keeps losing the stock of these SKUs; retry")
                await hydrate([keys[int(k) - 1][5:-1] for k in res[1:]])
            elif code == 4:
                # Only holds in flight are in the way: their commits (a few ms) decide. Wait for
                # them a little; past that, hold anyway and let Postgres decide under its lock.
                wait = next(waits, None)
                if wait is None:
                    force = True
                else:
                    await asyncio.sleep(wait)
            elif code == 3:
                line = lines[int(res[1]) - 1]
                raise NotFound("stock", f"{line.sku}@{line.location_id}")
            else:  # {2, ...}; or {5, ...}: the key never took stock
                raise InsufficientStock(tuple(self._shortfalls(lines, res)),
                                        key_unused=code == 5)

    @staticmethod
    def _hold_call(lines: Sequence[Line], *, pos: bool, hold_id: str, force: bool,
                   probe: KeyProbe | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of hold.lua for lines of one hash slot."""
        skus = sorted({x.sku for x in lines})
        keys = [stock_key(s) for s in skus] + [hold_key(s) for s in skus]
        index = {stock_key(s): i + 1 for i, s in enumerate(skus)}
        filtered = [META_KEY, *probe.buckets] if probe is not None else []
        args: list[Any] = ["1" if pos else "0", len(lines), hold_id, "1" if force else "0",
                           len(filtered)]
        for line in lines:
            args += [index[stock_key(line.sku)], line.location_id, line.quantity]
        if probe is not None:
            args += [probe.expire_at_ms, *probe.offsets]
        return keys + filtered, args

    @staticmethod
    def _shortfalls(lines: Sequence[Line], res: list[Any]) -> list[Shortfall]:
        """hold.lua's {2, line, available, ...} as shortfalls."""
        return [Shortfall(lines[int(i) - 1].sku, lines[int(i) - 1].location_id,
                          lines[int(i) - 1].quantity, int(a))
                for i, a in zip(res[1::2], res[2::2], strict=True)]

    async def give_back(self, hold: Hold) -> None:
        """Return held units, exactly once: only while the hold's record is still there."""
        await self._settle_hold(hold.id, sorted({x.sku for x in hold.lines}), ())

    async def forget(self, hold: Hold, committed: Sequence[StockLevel]) -> None:
        """Postgres committed the hold: its units move from held to the `committed` levels."""
        await self._settle_hold(hold.id, sorted({x.sku for x in hold.lines}), committed)

    async def settle_many(self, settled: Sequence[tuple[Hold, Sequence[StockLevel]]],
                          levels: Iterable[StockLevel] = ()) -> None:
        """Many holds' ends (`forget` with their committed levels, or `give_back` with none) and
        `apply_changes` of `levels` first, all in one round trip."""
        calls = self._apply_calls(levels)
        for hold, committed in settled:
            calls += self._settle_calls(hold.id, sorted({x.sku for x in hold.lines}), committed)
        if calls:
            with translate_redis():
                await self._run_scripts(calls)

    async def _settle_hold(self, hold_id: str, skus: Sequence[str],
                           committed: Sequence[StockLevel]) -> int:
        with translate_redis():
            return sum(int(n) for n in await self._run_scripts(
                self._settle_calls(hold_id, skus, committed)))

    def _settle_calls(self, hold_id: str, skus: Sequence[str],
                      committed: Sequence[StockLevel]) -> list[ScriptCall]:
        calls: list[ScriptCall] = []
        for group in self._groups(skus, str):
            keys = [stock_key(s) for s in group] + [hold_key(s) for s in group]
            index = {stock_key(s): i + 1 for i, s in enumerate(group)}
            rows = [lv for lv in committed if stock_key(lv.sku) in index]
            calls.append((self._settle, keys, [hold_id, len(rows), *_rows(rows, index)]))
        return calls

    async def settle_record(self, sku: str, hold_id: str,
                            committed: Sequence[StockLevel] = ()) -> bool:
        """The reconciler's end of one SKU's record of a hold: an orphan's units are given back
        (no `committed`), a committed one's move to the `committed` levels."""
        return bool(await self._settle_hold(hold_id, [sku], committed))

    async def inspect(
        self, skus: Sequence[str], only: Mapping[str, Collection[str] | None] | None = None
    ) -> tuple[dict[str, list[Cached] | None], dict[str, list[HoldRecord]], int]:
        """What Redis has of each SKU (None: not hydrated; with `only`, of those locations of
        it, None: all) and its hold records, with the Redis clock (ms). Values and records of
        one slot are read in one script (inspect.lua), so of the same instant; the slots' scripts
        go in one round trip. Each record's time is moved onto the returned clock by the
        difference between its node's clock and that one (nodes of a cluster each have theirs)."""
        groups = self._groups(dict.fromkeys(skus), str)
        def fields_of(sku: str) -> list[str]:  # inspect.lua's ARGV of one SKU
            wanted = None if only is None else only.get(sku)
            return [str(len(wanted)), *sorted(wanted)] if wanted else ["0"]

        calls: list[ScriptCall] = [
            (self._inspect, [stock_key(s) for s in g] + [hold_key(s) for s in g],
             [x for s in g for x in fields_of(s)])
            for g in groups]
        with translate_redis():
            results = await self._run_scripts(calls) if calls else []
        clocks = [int(r[0]) * 1000 + int(r[1]) // 1000 for r in results]
        now_ms = max(clocks, default=0)
        cached: dict[str, list[Cached] | None] = {}
        holds: dict[str, list[HoldRecord]] = {}
        for group, res, clock in zip(groups, results, clocks, strict=True):
            for i, sku in enumerate(group):
                fields, recs = _pairs(res[2 + i]), _pairs(res[2 + len(group) + i])
                cached[sku] = decode_cached(sku, fields) if b"_" in fields else None
                holds[sku] = [_shifted(decode_hold(k.decode(), v), now_ms - clock)
                              for k, v in recs.items()]
        return cached, holds, now_ms

    async def skus_with_holds(self) -> list[str]:
        """SKUs with hold records (a hold hash goes with its last record), by SCAN."""
        with translate_redis():
            keys = [k async for k in self.client.scan_iter(match="hold:{*", count=1000)]
        return sorted({(k.decode() if isinstance(k, bytes) else k)[6:-1] for k in keys})

    # ---- applying committed state ------------------------------------------------------------
    async def apply_changes(self, levels: Iterable[StockLevel]) -> None:
        """Bring committed Postgres levels in; a level older than Redis' (by seq) is ignored.

        Best effort by design: if Redis is down the reconciler repairs it from Postgres later.
        """
        calls = self._apply_calls(levels)
        if calls:
            with translate_redis():
                await self._run_scripts(calls)

    def _apply_calls(self, levels: Iterable[StockLevel]) -> list[ScriptCall]:
        calls: list[ScriptCall] = []
        for group in self._groups(levels, lambda lv: lv.sku):
            keys = sorted({stock_key(lv.sku) for lv in group})
            index = {k: i + 1 for i, k in enumerate(keys)}
            calls.append((self._apply, keys, [len(group), *_rows(group, index)]))
        return calls

    # ---- reads and rebuilds ----------------------------------------------------------------
    async def read_fields(self, skus: Sequence[str], locations: Sequence[str] = ()
                          ) -> list[dict[bytes, bytes] | None]:
        """Each SKU's hash as stored (decode with decode_levels), or with `locations` only those
        fields; None where not hydrated (storage/redis_reads)."""
        with translate_redis():
            results = await self._reader.read([stock_key(s) for s in skus], locations)
        return [fields if b"_" in fields else None for fields in results]

    async def markers(self, skus: Sequence[str]) -> list[bytes | None]:
        """Each SKU's marker field "_": a count of the hash's changes (bump.lua), so a reader
        that keeps something derived from a hash knows by this one field whether it is still
        current; None where not hydrated. One round trip: one script on a single server, one
        per hash slot on a cluster (markers.lua)."""
        if not skus:
            return []
        groups = self._groups(range(len(skus)), skus.__getitem__)
        with translate_redis():
            replies = await self._run_scripts(
                [(self._markers, [stock_key(skus[i]) for i in group], []) for group in groups])
        got: list[bytes | None] = [None] * len(skus)
        for group, reply in zip(groups, replies, strict=True):
            for i, mark in zip(group, reply, strict=True):
                got[i] = mark
        return got

    async def load(self, snapshot: dict[str, list[StockLevel]], *, force: bool) -> int:
        """Write SKUs from a Postgres snapshot; without `force`, only where not hydrated."""
        if not snapshot:
            return 0
        calls: list[ScriptCall] = []
        for sku, levels in snapshot.items():
            args: list[Any] = ["1" if force else "0"]
            for lv in levels:
                args += [lv.location_id, encode_committed(lv)]
            calls.append((self._hydrate, [stock_key(sku), hold_key(sku)], args))
        with translate_redis():
            written = await self._run_scripts(calls)
        return sum(int(w) for w in written)

    async def repair(self, sku: str, location_id: str, observed: str, value: str) -> bool:
        with translate_redis():
            res = await self._repair(keys=[stock_key(sku)], args=[location_id, observed, value])
        return bool(res)

    async def generation(self) -> str | None:
        with translate_redis():
            value = await self.client.hget(META_KEY, "generation")
        return None if value is None else text_of(value)

    async def set_generation(self, generation: str, built_on: str = "") -> None:
        """The marker: which Postgres the data comes from, and on which server process (run id)
        it was built; see checkrun.lua."""
        pairs = ["generation", generation] + (["built_on", built_on] if built_on else [])
        with translate_redis():
            await self.client.execute_command("HSET", META_KEY, *pairs)

    async def built_on(self) -> str | None:
        with translate_redis():
            value = await self.client.hget(META_KEY, "built_on")
        return None if value is None else text_of(value)

    async def ping(self) -> bool:
        with translate_redis():
            return bool(await self.client.ping())


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A flat HGETALL reply (as a script returns it) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _shifted(rec: HoldRecord, ms: int) -> HoldRecord:
    return rec if ms == 0 else HoldRecord(rec.id, rec.created_ms + ms, rec.units)


def _info_field(info: Any, name: str) -> str:
    if isinstance(info, dict):
        return str(info.get(name, ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _cut_connection(exc: BaseException) -> bool:
    """redis-py's asyncio cluster client, when a node fails, resets connections that other
    commands may be using at that moment; such a command fails with an AttributeError raised in
    redis-py itself (its connection's writer or reader is gone). That is a lost connection too."""
    if not isinstance(exc, AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


class translate_redis:
    """Redis connection trouble becomes UNAVAILABLE."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is not None and (isinstance(exc, REDIS_ERRORS) or _cut_connection(exc)):
            raise Unavailable(f"redis unavailable: {exc!r}") from exc
