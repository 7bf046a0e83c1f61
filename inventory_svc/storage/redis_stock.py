"""Redis: the atomic gate for holds and the read model of stock (DESIGN.md §2).

One hash per SKU, `inv:{sku}`, so every location of a SKU lives in one cluster slot; each field
is a location id with the value "on_hand:reserved:safety:version". Field "_" marks a hash that
was loaded whole from Postgres: without it the SKU must be hydrated before it is trusted.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from inventory_svc.domain.errors import InsufficientStock, NotFound, Shortfall, Unavailable
from inventory_svc.domain.model import Line, StockLevel

META_KEY = "inv:meta"
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
Hydrator = Callable[[list[str]], Awaitable[None]]
Client = aioredis.Redis | RedisCluster


def stock_key(sku: str) -> str:
    return "inv:{" + sku + "}"


def encode_level(level: StockLevel) -> str:
    return f"{level.on_hand}:{level.reserved}:{level.safety_stock}:{level.version}"


def decode_levels(sku: str, fields: dict[bytes, bytes]) -> list[StockLevel]:
    out = []
    for loc, value in fields.items():
        if loc == b"_":
            continue
        h, r, s, v = value.split(b":")
        out.append(StockLevel(sku, loc.decode(), int(h), int(r), int(s), int(v)))
    return out


def _script(name: str) -> str:
    return resources.files("inventory_svc.storage").joinpath(f"lua/{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Hold:
    """Units this call holds in Redis, to be given back if Postgres does not commit them."""

    lines: tuple[Line, ...]


class RedisStock:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._hold = client.register_script(_script("hold"))
        self._apply = client.register_script(_script("apply"))
        self._hydrate = client.register_script(_script("hydrate"))
        self._repair = client.register_script(_script("repair"))

    @classmethod
    def from_url(cls, url: str, *, cluster: bool, timeout_s: float) -> RedisStock:
        opts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        client: Client
        if cluster:
            client = RedisCluster.from_url(url, **opts)
        else:
            client = aioredis.Redis.from_url(url, health_check_interval=10, **opts)
        return cls(client)

    async def close(self) -> None:
        await self.client.aclose()

    # ---- holds -----------------------------------------------------------------------------
    async def hold(self, lines: Sequence[Line], *, pos: bool, hydrate: Hydrator) -> Hold:
        """Hold every line or none: one atomic script per hash slot, slots in ascending order,
        earlier slots given back if a later one is short."""
        by_slot: dict[int, list[Line]] = defaultdict(list)
        for line in lines:
            by_slot[key_slot(stock_key(line.sku).encode())].append(line)
        taken: list[Line] = []
        try:
            for slot in sorted(by_slot):
                group = by_slot[slot]
                await self._hold_slot(group, pos=pos, hydrate=hydrate)
                taken.extend(group)
        except BaseException:
            if taken:
                await asyncio.shield(self.give_back(Hold(tuple(taken))))
            raise
        return Hold(tuple(lines))

    async def _hold_slot(self, lines: list[Line], *, pos: bool, hydrate: Hydrator) -> None:
        keys = sorted({stock_key(x.sku) for x in lines})
        index = {k: i + 1 for i, k in enumerate(keys)}
        args: list[Any] = ["1" if pos else "0", len(lines)]
        for line in lines:
            args += [index[stock_key(line.sku)], line.location_id, line.quantity]
        for _ in range(3):
            with translate_redis():
                res = await self._hold(keys=keys, args=args)
            code = int(res[0])
            if code == 0:
                return
            if code == 1:
                await hydrate([keys[int(res[1]) - 1][5:-1]])
                continue
            if code == 3:
                line = lines[int(res[1]) - 1]
                raise NotFound("stock", f"{line.sku}@{line.location_id}")
            shorts = [
                Shortfall(lines[int(i) - 1].sku, lines[int(i) - 1].location_id,
                          lines[int(i) - 1].quantity, int(a))
                for i, a in zip(res[1::2], res[2::2], strict=True)
            ]
            raise InsufficientStock(tuple(shorts))
        raise Unavailable("redis keeps losing the stock of these SKUs; retry")

    async def give_back(self, hold: Hold) -> None:
        """Return held units (idempotent per call site: each hold is given back at most once)."""
        await self.apply_changes([], [(x, -x.quantity) for x in hold.lines])

    # ---- applying committed state ------------------------------------------------------------
    async def apply_changes(
        self, levels: Iterable[StockLevel], reserved_moves: Iterable[tuple[Line, int]] = ()
    ) -> None:
        """Bring committed Postgres levels in (newer versions win), and move reserved units.

        Best effort by design: if Redis is down the reconciler repairs it from Postgres later.
        """
        rows: dict[int, list[tuple[str, str, int, int, int, int]]] = defaultdict(list)
        for lv in levels:
            rows[key_slot(stock_key(lv.sku).encode())].append(
                (lv.sku, lv.location_id, lv.on_hand, lv.safety_stock, lv.version, 0)
            )
        for line, delta in reserved_moves:
            # version -1 never wins, so only the reserved delta is applied
            rows[key_slot(stock_key(line.sku).encode())].append(
                (line.sku, line.location_id, 0, 0, -1, delta)
            )
        if not rows:
            return
        with translate_redis():
            async with self.client.pipeline(transaction=False) as pipe:
                for slot in sorted(rows):
                    group = rows[slot]
                    keys = sorted({stock_key(r[0]) for r in group})
                    index = {k: i + 1 for i, k in enumerate(keys)}
                    args: list[Any] = [len(group)]
                    for sku, loc, h, s, v, dr in group:
                        args += [index[stock_key(sku)], loc, h, s, v, dr]
                    await self._apply(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
                await pipe.execute()

    # ---- reads and rebuilds ----------------------------------------------------------------
    async def read(self, skus: Sequence[str]) -> dict[str, list[StockLevel] | None]:
        """Stock levels of each SKU; None where the SKU is not hydrated."""
        with translate_redis():
            async with self.client.pipeline(transaction=False) as pipe:
                for sku in skus:
                    pipe.hgetall(stock_key(sku))
                results = await pipe.execute()
        return {
            sku: (decode_levels(sku, fields) if b"_" in fields else None)
            for sku, fields in zip(skus, results, strict=True)
        }

    async def load(self, snapshot: dict[str, list[StockLevel]], *, force: bool) -> int:
        """Write SKUs from a Postgres snapshot; without `force`, only where not hydrated."""
        if not snapshot:
            return 0
        with translate_redis():
            async with self.client.pipeline(transaction=False) as pipe:
                for sku, levels in snapshot.items():
                    args: list[Any] = ["1" if force else "0"]
                    for lv in levels:
                        args += [lv.location_id, encode_level(lv)]
                    await self._hydrate(
                        keys=[stock_key(sku)], args=args, client=pipe)  # type: ignore[arg-type]
                written = await pipe.execute()
        return sum(int(w) for w in written)

    async def repair(self, sku: str, location_id: str, observed: str, value: str) -> bool:
        with translate_redis():
            res = await self._repair(keys=[stock_key(sku)], args=[location_id, observed, value])
        return bool(res)

    async def generation(self) -> str | None:
        with translate_redis():
            value = await self.client.hget(META_KEY, "generation")
        if value is None:
            return None
        return value if isinstance(value, str) else value.decode()

    async def set_generation(self, generation: str) -> None:
        with translate_redis():
            await self.client.hset(META_KEY, "generation", generation)

    async def ping(self) -> bool:
        with translate_redis():
            return bool(await self.client.ping())


class translate_redis:
    """Redis connection trouble becomes UNAVAILABLE."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is not None and isinstance(exc, REDIS_ERRORS):
            raise Unavailable(f"redis unavailable: {exc!r}") from exc
