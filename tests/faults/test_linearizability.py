"""Linearizability: ≥ 10k concurrent operations from 32 clients on a few SKU-locations, each
SKU-location's history checked against the sequential specification (tests/faults/linearizability.py);
and the same checker catching a planted check-then-decrement bug."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.domain.errors import InsufficientStock, Shortfall
from inventory_svc.domain.model import Channel
from inventory_svc.storage.pg import PgStore
from inventory_svc.storage.redis_layout import decode_cached, hold_key, stock_key
from inventory_svc.storage.redis_stock import Hold, RedisStock
from tests.conftest import Stores
from tests.faults.harness import check_all, make_world, own_site, running, site_settings
from tests.faults.linearizability import Op, check, stock_spec

CLIENTS = 32
ON_HAND = 30


async def record(target: str, skus: list[str], locs: list[str], total: int,
                 seed: int = 3, strict: bool = True,
                 clients: int = CLIENTS) -> dict[tuple[str, str], list[Op]]:
    """Run `total` operations from CLIENTS clients; the history per SKU-location. Not `strict`
    (the planted bug): a call refused otherwise than for stock is left out of the history."""
    history: dict[tuple[str, str], list[Op]] = defaultdict(list)
    keys = [(s, loc) for s in skus for loc in locs]
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    left = [total]

    async def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        stub = api_grpc.InventoryServiceStub(channels[c % len(channels)])
        mine: list[tuple[str, tuple[str, str], int]] = []
        while left[0] > 0:
            left[0] -= 1
            key = rng.choice(keys)
            roll = rng.random()
            start = time.monotonic()
            try:
                if roll < 0.45 or (roll < 0.7 and not mine):
                    qty = rng.randint(1, 4)
                    try:
                        out = await stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
                            sku=key[0], location_id=key[1], quantity=qty)], ttl_seconds=600))
                        mine.append((out.reservation.id, key, qty))
                        result = "OK"
                    except grpc.aio.AioRpcError as err:
                        if not strict and err.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                            continue
                        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err
                        result = "SHORT"
                    history[key].append(Op(start, time.monotonic(), "reserve", qty, result, c))
                elif roll < 0.7:
                    res_id, key, qty = mine.pop(rng.randrange(len(mine)))
                    commit = roll >= 0.6
                    if commit:
                        await stub.CommitReservation(api.CommitReservationRequest(
                            reservation_id=res_id))
                    else:
                        await stub.ReleaseReservation(api.ReleaseReservationRequest(
                            reservation_id=res_id))
                    history[key].append(Op(start, time.monotonic(), "commit" if commit else "release",
                                           qty, "OK", c))
                elif roll < 0.75:
                    delta = rng.randint(1, 3)
                    await stub.AdjustStock(api.AdjustStockRequest(
                        sku=key[0], location_id=key[1], delta=delta,
                        reason=api.ADJUSTMENT_REASON_RECEIPT))
                    history[key].append(Op(start, time.monotonic(), "adjust", delta, "OK", c))
                else:
                    got = await stub.GetAvailability(api.GetAvailabilityRequest(
                        skus=[key[0]], location_ids=[key[1]]))
                    lv = got.items[0].levels[0]
                    history[key].append(Op(start, time.monotonic(), "read", None,
                                           (lv.on_hand, lv.reserved), c))
            except grpc.aio.AioRpcError:
                if strict:
                    raise

    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        for ch in channels:
            await ch.close()
    return history


def verdicts(history: dict[tuple[str, str], list[Op]]) -> dict[tuple[str, str], Any]:
    return {key: check(ops, (ON_HAND, 0), stock_spec) for key, ops in history.items()}


async def test_histories_of_32_clients_are_linearizable(stores: Stores, soak: bool) -> None:
    total = 50_000 if soak else 7_000
    async with own_site(stores) as site, running(site_settings(stores, site)) as (svc, stub, _):
        # 8 SKU-locations: each sees ~4 of the 32 clients at once on average, which keeps the
        # search of each history tractable on a slow box (it grows fast with the overlap)
        w = await make_world(stub, locations=2, skus=4, on_hand=ON_HAND)
        started = time.monotonic()
        history = await record(f"127.0.0.1:{svc.port}", w.skus, w.locations, total)
        took = time.monotonic() - started
        started = time.monotonic()
        found = await asyncio.to_thread(verdicts, history)
        checked = time.monotonic() - started
        assert sum(len(h) for h in history.values()) == total
        bad = {k: v for k, v in found.items() if not v.ok}
        assert not bad, f"not linearizable: {bad}"
        await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus)
        print(f"linearizable: {total} ops of {CLIENTS} clients on {len(history)} SKU-locations "
              f"in {took:.1f}s, checked in {checked:.1f}s "
              f"({sum(v.configurations for v in found.values())} configurations)")


# ---- the planted bug ------------------------------------------------------------------------------
async def racy_hold(self: RedisStock, lines: Any, *, pos: bool, hydrate: Any,
                    hold_id: str = "") -> Hold:
    """Check, then decrement: the availability is read, and written back later, not atomically."""
    (line,) = lines
    fields = await self.client.hgetall(stock_key(line.sku))
    if b"_" not in fields:
        await hydrate([line.sku])
        fields = await self.client.hgetall(stock_key(line.sku))
    have = {c.level.location_id: c for c in decode_cached(line.sku, fields)}[line.location_id]
    avail = max(0, have.level.available(Channel.POS if pos else Channel.WEB) - have.held)
    if avail < line.quantity:
        raise InsufficientStock((Shortfall(line.sku, line.location_id, line.quantity, avail),))
    await asyncio.sleep(0.001)  # the window every such bug has
    await self.client.hset(stock_key(line.sku), line.location_id,
                           replace(have, held=have.held + line.quantity).encode())
    await self.client.hset(hold_key(line.sku), hold_id, f"0;{line.location_id}={line.quantity}")
    return Hold(tuple(lines), hold_id)


async def unlocked_rows(conn: Any, keys: Any, *, create: bool = False,
                        timeout: float | None = None) -> Any:
    """lock_stock_timed without its row locks: Postgres checks a value others are changing."""
    ordered = sorted(set(keys))
    rows = await conn.fetch(
        "SELECT s.sku, s.location_id, s.on_hand, s.reserved, COALESCE(s.safety_stock, 0) AS safety,"
        " s.version, s.seq, true AS active, now() AS now FROM stock s"
        " JOIN unnest($1::text[], $2::text[]) AS k(sku, location_id)"
        " ON s.sku = k.sku AND s.location_id = k.location_id",
        [k[0] for k in ordered], [k[1] for k in ordered])
    await asyncio.sleep(0.001)
    from inventory_svc.domain.rules import LockedStock
    from inventory_svc.storage.pg import stock_level
    out = {(r["sku"], r["location_id"]): LockedStock(stock_level(r), True) for r in rows}
    return out, rows[0]["now"]


async def test_checker_catches_a_planted_check_then_decrement(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with own_site(stores) as site, running(site_settings(stores, site)) as (svc, stub, _):
        w = await make_world(stub, locations=1, skus=1, on_hand=ON_HAND)
        monkeypatch.setattr(RedisStock, "hold", racy_hold)
        monkeypatch.setattr(PgStore, "lock_stock_timed", staticmethod(unlocked_rows))
        # a short history of fewer clients: proving a history NOT linearizable means trying
        # every order of its operations, which grows fast with the clients at once
        history = await record(f"127.0.0.1:{svc.port}", w.skus, w.locations, 400,
                               strict=False, clients=8)
        monkeypatch.undo()
        found = await asyncio.to_thread(verdicts, history)
        assert not all(v.ok for v in found.values()), "the checker missed the planted bug"
        bad = next(v for v in found.values() if not v.ok)
        print(f"planted check-then-decrement caught: {bad}")
