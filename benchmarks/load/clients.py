"""What a worker process talks through: gRPC channels (round robin), Redis, Postgres, and the
recorder that times every call into the phase's statistics."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc

from benchmarks.echo_server import METHOD as ECHO_METHOD
from benchmarks.load.stats import PhaseStats
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2_grpc as rp_grpc

CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Counters:
    """Running totals a worker reports to the coordinator's progress line."""

    __slots__ = ("calls", "errors", "inflight", "shed")

    def __init__(self) -> None:
        self.calls = self.errors = self.shed = self.inflight = 0


class Recorder:
    """Times calls into `stats` (None: warm-up, counted for progress only)."""

    def __init__(self, stats: PhaseStats | None, counters: Counters, window_start: float,
                 window_end: float, timeout_s: float) -> None:
        self.stats = stats
        self.counters = counters
        self.window_start = window_start
        self.window_end = window_end
        self.timeout_s = timeout_s

    async def call(self, name: str, method: Any, request: Any,
                   start: float | None = None) -> Any:
        """One unary call; latency from `start` (an open loop's intended time) or from now.

        Returns the response, or None when the call failed (counted by status code)."""
        t0 = perf_counter() if start is None else start
        detail = ""
        try:
            resp = await method(request, timeout=self.timeout_s)
            code = None
        except grpc.aio.AioRpcError as exc:
            resp, code, detail = None, exc.code().name, exc.details() or ""
        self.done(name, t0, code, detail=detail)
        return resp

    def done(self, name: str, t0: float, code: str | None, items: int = 1, detail: str = "") -> None:
        """Record one finished operation that started at t0."""
        c = self.counters
        c.calls += 1
        if code is not None:
            c.errors += 1
        if self.stats is not None:
            now = perf_counter()
            self.stats.rpc(name).record(now - t0, code, items, now <= self.window_end, detail)
            self.stats.tick(int(max(0.0, t0 - self.window_start)), now - t0)


class Clients:
    """Lazily opened connections of one worker, reused across phases."""

    def __init__(self, channels_per_target: int) -> None:
        self.per_target = max(1, channels_per_target)
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._redis: dict[str, Any] = {}
        self._pg: dict[str, Any] = {}

    def _cycle(self, target: str, kind: str) -> Any:
        key = (target, kind)
        if key not in self._stubs:
            if target not in self._channels:
                self._channels[target] = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
                                          for _ in range(self.per_target)]
            chans = self._channels[target]
            if kind == "inventory":
                stubs: list[Any] = [api_grpc.InventoryServiceStub(c) for c in chans]
            elif kind == "routing":
                stubs = [rp_grpc.RoutingServiceStub(c) for c in chans]
            else:
                stubs = [c.unary_unary(ECHO_METHOD, None, None) for c in chans]
            self._stubs[key] = itertools.cycle(stubs)
        return self._stubs[key]

    # (the generated stubs are typed for the sync API; on an aio channel every method is awaitable)
    def inventory(self, target: str) -> Any:
        return next(self._cycle(target, "inventory"))

    def routing(self, target: str) -> Any:
        return next(self._cycle(target, "routing"))

    def echo(self, target: str) -> Callable[..., Awaitable[bytes]]:
        fn: Callable[..., Awaitable[bytes]] = next(self._cycle(target, "echo"))
        return fn

    async def redis(self, url: str) -> Any:
        if url not in self._redis:
            import redis.asyncio as aioredis

            self._redis[url] = aioredis.Redis.from_url(url)
        return self._redis[url]

    async def pg(self, url: str, size: int) -> Any:
        if url not in self._pg:
            import asyncpg

            self._pg[url] = await asyncpg.create_pool(url, min_size=size, max_size=size)
        return self._pg[url]

    async def close(self) -> None:
        for chans in self._channels.values():
            for c in chans:
                await c.close(None)
        for r in self._redis.values():
            await r.aclose()
        for p in self._pg.values():
            await p.close()
