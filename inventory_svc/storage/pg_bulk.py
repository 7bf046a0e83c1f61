"""The first load of stock into rows that do not exist yet (`serve --demo`): one statement a
batch writes the rows and their IMPORT ledger rows, the ledger's on_hand_after their count.

Faster than ImportStock (lock, create, write, ledger: four statements over every row, and the
domain objects around them) because there is nothing to lock or compare: rows that exist already
are left as they are (an interrupted load is finished, never redone). New rows are inserts, so no
WatchStock event is made for them; a consumer starts from a snapshot, and each SKU's total is
counted from its rows when its first event comes (storage/pg_watch.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from inventory_svc.domain.model import MovementKind


async def insert_new_stock(
    conn: asyncpg.Connection | asyncpg.Pool, skus: Sequence[str], locations: Sequence[str],
    on_hand: Sequence[int], reason: str,
) -> int:
    """Insert the (sku, location, on_hand) rows not there yet, with their ledger rows (one
    transaction); returns how many were new. The locations must exist."""
    return int(await conn.fetchval(
        "WITH new AS (INSERT INTO stock (sku, location_id, on_hand, version)"
        "  SELECT * , 1 FROM unnest($1::text[], $2::text[], $3::bigint[])"
        "  ORDER BY 1, 2 ON CONFLICT DO NOTHING RETURNING sku, location_id, on_hand),"
        " mv AS (INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after)"
        "  SELECT sku, location_id, on_hand, $4, $5, on_hand FROM new WHERE on_hand <> 0)"
        " SELECT count(*) FROM new",
        list(skus), list(locations), list(on_hand), MovementKind.IMPORT.value, reason))
