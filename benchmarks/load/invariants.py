"""The end-of-run check, read straight from Postgres (and Redis when we know it), DESIGN §3:

I1 0 ≤ reserved ≤ on_hand on every stock row (0 oversold); I2 reserved = Σ ACTIVE reservation
lines; I3 on_hand = Σ ledger deltas; I4 (reported, not gating) Redis agrees with Postgres and
never shows more available. For a flash sale: units reserved = units put on sale = OK answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

CHECK_SQL = """
WITH ledger AS (
    SELECT sku, location_id, sum(delta) AS total FROM movements GROUP BY sku, location_id),
held AS (
    SELECT rl.sku, rl.location_id, sum(rl.quantity) AS total
    FROM reservation_lines rl JOIN reservations r ON r.id = rl.reservation_id
    WHERE r.status = 'ACTIVE' GROUP BY rl.sku, rl.location_id)
SELECT s.sku, s.location_id, s.on_hand, s.reserved,
       COALESCE(l.total, 0) AS ledger, COALESCE(h.total, 0) AS held
FROM stock s
LEFT JOIN ledger l ON l.sku = s.sku AND l.location_id = s.location_id
LEFT JOIN held h ON h.sku = s.sku AND h.location_id = s.location_id
"""


async def check(database_url: str, *, redis_url: str | None = None,
                redis_skus: Sequence[str] = (), flash: Sequence[tuple[str, str]] = (),
                flash_units: int = 0, flash_ok: int | None = None,
                flash_runs: Sequence[dict[str, Any]] = (),
                settle_s: float = 5.0) -> dict[str, Any]:
    """Check I1-I3 over every stock row (I4 for `redis_skus`, the flash sale if given, and each
    of `flash_runs`: {"label", "hot": [(sku, location)], "units_each", "ok_answers"})."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(CHECK_SQL)
            reservations = {r["status"]: r["n"] for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM reservations GROUP BY status")}
            movements = await conn.fetchval("SELECT count(*) FROM movements")
    finally:
        await conn.close()
    oversold = [r for r in rows if not 0 <= r["reserved"] <= r["on_hand"]]
    ledger_bad = [r for r in rows if r["on_hand"] != r["ledger"]]
    held_bad = [r for r in rows if r["reserved"] != r["held"]]
    examples = [dict(r) for r in (oversold + ledger_bad + held_bad)[:10]]
    out: dict[str, Any] = {
        "stock_rows": len(rows), "movements": movements, "reservations": reservations,
        "oversold": len(oversold), "ledger_mismatch": len(ledger_bad),
        "reserved_mismatch": len(held_bad), "examples": examples,
        "ok": not (oversold or ledger_bad or held_bad),
    }
    by_key = {(r["sku"], r["location_id"]): r for r in rows}
    if flash:
        out["flash_sale"] = _flash(by_key, flash, flash_units, flash_ok)
        out["ok"] = out["ok"] and out["flash_sale"]["ok"]
    if flash_runs:
        out["flash_sales"] = [
            {"label": run.get("label", ""), **_flash(by_key, [tuple(x) for x in run["hot"]],
                                                     run["units_each"], run.get("ok_answers"))}
            for run in flash_runs]
        out["ok"] = out["ok"] and all(f["ok"] for f in out["flash_sales"])
    if redis_url and redis_skus:
        first = await _redis_vs_pg(redis_url, redis_skus, by_key)
        if first["differs"] and settle_s > 0:
            # a request still in flight at the service may legitimately differ: look again later
            await asyncio.sleep(settle_s)
            again = await check(database_url, redis_url=redis_url,
                                redis_skus=sorted({e["sku"] for e in first["examples"]}),
                                settle_s=0)
            first["persisting_after_s"] = settle_s
            first["persisting"] = again.get("redis", {}).get("differs", 0)
            first["persisting_examples"] = again.get("redis", {}).get("examples", [])
        out["redis"] = first
    return out


def _flash(by_key: dict[tuple[str, str], Any], hot: Sequence[tuple[str, str]], units_each: int,
           ok_answers: int | None) -> dict[str, Any]:
    """One flash sale: units reserved = units put on sale = OK answers."""
    reserved = sum(by_key[k]["reserved"] for k in hot if k in by_key)
    on_hand = sum(by_key[k]["on_hand"] for k in hot if k in by_key)
    expected = units_each * len(hot)
    return {
        "units_on_sale": expected, "on_hand": on_hand, "reserved": reserved,
        "ok_answers": ok_answers,
        # never more OKs than units held, never more held than on hand, nothing lost
        "ok": reserved <= on_hand == expected and (ok_answers is None or ok_answers <= reserved),
        # the expected outcome when demand exceeds supply: every unit sold, each to one OK
        "exact": ok_answers == reserved == on_hand,
    }


async def _redis_vs_pg(url: str, skus: Sequence[str],
                       pg: dict[tuple[str, str], Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        pipe = r.pipeline(transaction=False)
        for sku in skus:
            pipe.hgetall("inv:{" + sku + "}")
        hashes = await pipe.execute()
    finally:
        await r.aclose()
    compared = differs = more_available = not_hydrated = 0
    examples: list[dict[str, Any]] = []
    for sku, fields in zip(skus, hashes, strict=True):
        if b"_" not in fields:
            not_hydrated += 1
            continue
        for loc, value in fields.items():
            if loc == b"_":
                continue
            row = pg.get((sku, loc.decode()))
            h, res = (int(x) for x in value.split(b":")[:2])
            compared += 1
            if row is None or (h, res) != (row["on_hand"], row["reserved"]):
                differs += 1
                more = row is None or h - res > row["on_hand"] - row["reserved"]
                more_available += more
                if len(examples) < 50:
                    examples.append({"sku": sku, "location_id": loc.decode(), "redis": [h, res],
                                     "pg": [row["on_hand"], row["reserved"]] if row else None,
                                     "redis_more_available": more})
    return {"skus": len(skus), "rows_compared": compared, "differs": differs,
            "more_available_than_pg": more_available, "not_hydrated": not_hydrated,
            "examples": examples}
