"""Store-side counters around a step: Redis commands (INFO commandstats) and Postgres
transactions, WAL records/bytes and WAL fsyncs — divided by the operations of the step, they say
how many round trips and how much durable work one operation costs (background work included)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class StoreProbe:
    """Snapshots of the stores' cumulative counters; any store left None is skipped."""

    def __init__(self, redis_url: str | None, database_url: str | None) -> None:
        self.redis_url, self.database_url = redis_url, database_url

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.redis_url:
            with contextlib.suppress(Exception):
                out.update(self._redis())
        if self.database_url:
            with contextlib.suppress(Exception):
                out.update(asyncio.run(self._pg()))
        return out

    def _redis(self) -> dict[str, float]:
        import redis

        r = redis.Redis.from_url(self.redis_url or "")
        try:
            stats = r.info("commandstats")
        finally:
            r.close()
        return {"redis." + k.removeprefix("cmdstat_"): float(v["calls"]) for k, v in stats.items()}

    async def _pg(self) -> dict[str, float]:
        import asyncpg

        conn = await asyncpg.connect(self.database_url)
        try:
            out: dict[str, float] = {}
            db = await conn.fetchrow("SELECT xact_commit, xact_rollback FROM pg_stat_database"
                                     " WHERE datname = current_database()")
            out["pg.commits"], out["pg.rollbacks"] = float(db[0]), float(db[1])
            with contextlib.suppress(Exception):
                wal = await conn.fetchrow("SELECT wal_records, wal_bytes FROM pg_stat_wal")
                out["pg.wal_records"], out["pg.wal_bytes"] = float(wal[0]), float(wal[1])
            with contextlib.suppress(Exception):  # Postgres 16+: WAL fsyncs are in pg_stat_io
                out["pg.wal_fsyncs"] = float(await conn.fetchval(
                    "SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal'"))
            return out
        finally:
            await conn.close()


def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, Any]:
    """What one operation cost the stores on average, from two snapshots."""
    if ops <= 0 or not after:
        return {}
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    redis_cmds = {k.removeprefix("redis."): v / ops for k, v in delta.items()
                  if k.startswith("redis.") and v > 0 and k != "redis.info"}
    out: dict[str, Any] = {}
    if redis_cmds:
        out["redis_commands"] = round(sum(redis_cmds.values()), 2)
        out["redis_by_command"] = {k: round(v, 2) for k, v in
                                   sorted(redis_cmds.items(), key=lambda kv: -kv[1]) if v >= 0.01}
    for key in ("pg.commits", "pg.rollbacks", "pg.wal_records", "pg.wal_fsyncs"):
        if key in delta:
            out[key.removeprefix("pg.")] = round(delta[key] / ops, 3)
    if "pg.wal_bytes" in delta:
        out["wal_bytes"] = round(delta["pg.wal_bytes"] / ops)
    return out
