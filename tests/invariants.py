"""DESIGN §3 invariants I1-I4, checked across both stores for a set of SKUs."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from inventory_svc.server import Running
from inventory_svc.storage.redis_stock import RedisStock

_STOCK_WITH_SUMS = """
    SELECT s.sku, s.location_id, s.on_hand, s.reserved, s.version,
           COALESCE(s.safety_stock, l.default_safety_stock) AS safety,
           COALESCE((SELECT sum(rl.quantity) FROM reservation_lines rl
                     JOIN reservations r ON r.id = rl.reservation_id
                     WHERE r.status = 'ACTIVE' AND rl.sku = s.sku
                       AND rl.location_id = s.location_id), 0) AS active_lines,
           COALESCE((SELECT sum(m.delta) FROM movements m
                     WHERE m.sku = s.sku AND m.location_id = s.location_id), 0) AS ledger
    FROM stock s JOIN locations l ON l.id = s.location_id
    WHERE s.sku = ANY($1::text[])
"""


async def assert_postgres_invariants(pool: asyncpg.Pool, skus: Sequence[str]) -> list[asyncpg.Record]:
    """I1 0 <= reserved <= on_hand; I2 reserved = sum of ACTIVE lines; I3 on_hand = sum of the
    ledger. Returns the rows (with effective safety stock) for further checks."""
    rows = await pool.fetch(_STOCK_WITH_SUMS, list(skus))
    assert rows, f"no stock rows for {skus}"
    for r in rows:
        where = f"{r['sku']}@{r['location_id']}"
        assert 0 <= r["reserved"] <= r["on_hand"], f"I1 broken at {where}: {dict(r)}"
        assert r["reserved"] == r["active_lines"], f"I2 broken at {where}: {dict(r)}"
        assert r["on_hand"] == r["ledger"], f"I3 broken at {where}: {dict(r)}"
    return list(rows)


async def assert_invariants(service: Running, skus: Sequence[str]) -> None:
    """I1-I3 in Postgres, and I4: Redis equals Postgres (call when nothing is in flight)."""
    rows = await assert_postgres_invariants(service.ctx.pg.pool, skus)
    await assert_redis_equals_postgres(service.ctx.redis, rows, skus)


async def assert_redis_equals_postgres(
    redis: RedisStock, rows: Sequence[asyncpg.Record], skus: Sequence[str]
) -> None:
    """I4 with nothing in flight: every hydrated row equal to Postgres, nothing held, no hold
    record left."""
    cached, holds, _ = await redis.inspect(list(skus))
    for r in rows:
        where = f"{r['sku']}@{r['location_id']}"
        levels = cached[r["sku"]]
        if levels is None:  # not hydrated: Redis has nothing to disagree with
            continue
        have = {c.level.location_id: c for c in levels}.get(r["location_id"])
        assert have is not None, f"I4: {where} missing in redis"
        assert (have.level.on_hand, have.level.reserved, have.level.safety_stock, have.held) == (
            r["on_hand"], r["reserved"], r["safety"], 0
        ), f"I4 broken at {where}: redis {have} pg {dict(r)}"
    assert not any(holds.values()), f"hold records left with nothing in flight: {holds}"
