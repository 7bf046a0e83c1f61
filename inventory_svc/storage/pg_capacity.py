"""Shipping capacity in Postgres: the shipments of the day a location has taken, locked in
location (and day) order so that group commits and give-backs never deadlock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

import asyncpg


async def lock_capacity(conn: asyncpg.Connection, location_ids: Sequence[str]
                        ) -> dict[str, int]:
    """Today's shipments used per location, their rows made and locked in id order."""
    rows = await conn.fetch(
        "INSERT INTO capacity_usage AS c (location_id, day, used)"
        " SELECT x, current_date, 0 FROM unnest($1::text[]) AS x ORDER BY x"
        " ON CONFLICT (location_id, day) DO UPDATE SET used = c.used"
        " RETURNING location_id, used", list(location_ids))
    return {r["location_id"]: r["used"] for r in rows}


async def write_capacity(conn: asyncpg.Connection, used: dict[str, int]) -> None:
    """Store today's shipments used of rows locked by lock_capacity."""
    await conn.execute(
        "UPDATE capacity_usage c SET used = x.used"
        " FROM unnest($1::text[], $2::int[]) AS x(location_id, used)"
        " WHERE c.location_id = x.location_id AND c.day = current_date",
        list(used), list(used.values()))


async def give_back_capacity(conn: asyncpg.Connection,
                             slots: Mapping[tuple[str, date], int]) -> None:
    """Give back shipments of (location, day) taken by reservations that no longer hold
    units there. The rows are locked first in (location, day) order, the order
    lock_capacity takes them in, so two give-backs or a give-back and a group commit never
    deadlock; a row cleared by hand is left at 0, never below."""
    keys = sorted(slots)
    locs, days = [k[0] for k in keys], [k[1] for k in keys]
    await conn.execute(
        "SELECT 1 FROM capacity_usage c"
        " JOIN unnest($1::text[], $2::date[]) AS x(location_id, day)"
        " ON c.location_id = x.location_id AND c.day = x.day"
        " ORDER BY c.location_id, c.day FOR UPDATE OF c", locs, days)
    await conn.execute(
        "UPDATE capacity_usage c SET used = GREATEST(c.used - x.n, 0)"
        " FROM unnest($1::text[], $2::date[], $3::int[]) AS x(location_id, day, n)"
        " WHERE c.location_id = x.location_id AND c.day = x.day",
        locs, days, [slots[k] for k in keys])


async def set_capacity_held(conn: asyncpg.Connection, res_id: str,
                            location_ids: Sequence[str]) -> None:
    """The locations whose shipment a reservation still holds (after giving some back)."""
    await conn.execute(
        "UPDATE reservations SET capacity_locations = $2::text[] WHERE id = $1",
        res_id, list(location_ids))
