"""The peer's statements: every hot-path call is one statement (a transaction of its own, or the
body of one when an idempotency answer has to be stored with it).

All of them write our migrations' tables, so the harness's invariant check reads the peer's
database unchanged. Stock rows are always locked in (sku, location_id) order, a reservation
before its stock rows, so no two calls of the peer can deadlock. Timestamps travel as epoch
milliseconds (float8 in, int8 out): cheaper to encode than datetimes, and what the protos carry.

`{outbox}` marks where the optional outbox CTE goes (`--outbox`: the RESERVATION events our
service writes; off by default, as the invariant check does not read them).
"""

from __future__ import annotations

# the effective safety stock of a row, for remote channels (POS may sell its own buffer)
_SAFETY = "CASE WHEN $4::bool THEN 0 ELSE COALESCE(s.safety_stock, l.default_safety_stock) END"
_MS = "(extract(epoch FROM {col}) * 1000)::int8"

# One line: the conditional UPDATE is the whole check (Postgres re-evaluates its WHERE on the
# newest row version after waiting for a concurrent writer's lock, so two calls cannot both take
# the last unit), and the reservation, its line and the idempotency answer ride along as
# data-modifying CTEs that insert only when the UPDATE took the units. A call that loses reads
# what it needs for its answer (the row as the statement saw it, a stored answer) in the same
# statement; the lateral joins run only then. The answer's bytes are built before the
# statement (id, times and lines are ours to choose), so a keyed call is still one statement.
# $1 sku, $2 location, $3 quantity, $4 POS, $5 id, $6 channel, $7 order_ref, $8 created ms,
# $9 expires ms, $10 key (NULL: none), $11 request hash, $12 answer bytes.
RESERVE_ONE = f"""
WITH upd AS (
    UPDATE stock s SET reserved = s.reserved + $3::int8
    FROM locations l
    WHERE s.sku = $1::text AND s.location_id = $2::text AND l.id = s.location_id AND l.active
      AND s.on_hand - s.reserved - {_SAFETY} >= $3::int8
      AND NOT EXISTS (SELECT 1 FROM idempotency i WHERE i.key = $10::text)
    RETURNING s.sku),
res AS (
    INSERT INTO reservations (id, status, channel, order_ref, created_at, expires_at)
    SELECT $5::text, 'ACTIVE', $6::text, $7::text, to_timestamp($8::float8 / 1000),
           to_timestamp($9::float8 / 1000)
    FROM upd),
ln AS (
    INSERT INTO reservation_lines (reservation_id, sku, location_id, quantity, requested)
    SELECT $5::text, $1::text, $2::text, $3::int8, $3::int8 FROM upd),
idem AS (
    INSERT INTO idempotency (key, method, request_hash, response)
    SELECT $10::text, 'Reserve', $11::bytea, $12::bytea FROM upd WHERE $10::text IS NOT NULL){{outbox}}
SELECT u.n AS took, x.on_hand, x.reserved, x.safety, x.active,
       i.method, i.request_hash, i.response
FROM (SELECT count(*) AS n FROM upd) u
LEFT JOIN LATERAL (
    SELECT s.on_hand, s.reserved, COALESCE(s.safety_stock, l.default_safety_stock) AS safety,
           l.active
    FROM stock s JOIN locations l ON l.id = s.location_id
    WHERE u.n = 0 AND s.sku = $1::text AND s.location_id = $2::text) x ON true
LEFT JOIN LATERAL (
    SELECT i.method, i.request_hash, i.response FROM idempotency i
    WHERE u.n = 0 AND i.key = $10::text) i ON true
"""
RESERVE_ONE_OUTBOX = """,
ob AS (
    INSERT INTO outbox (kind, payload)
    SELECT 'RESERVATION', jsonb_build_object('reservation_id', $5::text, 'status', 'ACTIVE',
                                             'order_ref', $7::text) FROM upd)"""

# Several lines, all or none, still one statement: `lk` locks the rows in (sku, location) order
# and reads their newest versions; `go` decides on all of them; the UPDATE joins `go`, so no
# row is written before every lock is held and the decision made (`go` aggregates all of `lk`).
# $1-$3 the lines (sku, location, quantity arrays), $4-$12 as RESERVE_ONE.
RESERVE_MANY = """
WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS k(sku, loc, qty)),
lk AS MATERIALIZED (
    SELECT s.sku, s.location_id, s.on_hand, s.reserved,
           COALESCE(s.safety_stock, l.default_safety_stock) AS safety, l.active
    FROM stock s JOIN locations l ON l.id = s.location_id
    WHERE (s.sku, s.location_id) IN (SELECT k.sku, k.loc FROM k)
      AND NOT EXISTS (SELECT 1 FROM idempotency i WHERE i.key = $10::text)
    ORDER BY s.sku, s.location_id
    FOR UPDATE OF s),
go AS MATERIALIZED (
    SELECT count(*) = cardinality($1::text[]) AND coalesce(bool_and(
               lk.active AND lk.on_hand - lk.reserved
               - CASE WHEN $4::bool THEN 0 ELSE lk.safety END >= k.qty), false) AS ok
    FROM lk JOIN k ON k.sku = lk.sku AND k.loc = lk.location_id),
upd AS (
    UPDATE stock s SET reserved = s.reserved + k.qty FROM k, go
    WHERE go.ok AND s.sku = k.sku AND s.location_id = k.loc
    RETURNING s.sku),
res AS (
    INSERT INTO reservations (id, status, channel, order_ref, created_at, expires_at)
    SELECT $5::text, 'ACTIVE', $6::text, $7::text, to_timestamp($8::float8 / 1000),
           to_timestamp($9::float8 / 1000)
    FROM go WHERE go.ok),
ln AS (
    INSERT INTO reservation_lines (reservation_id, sku, location_id, quantity, requested)
    SELECT $5::text, k.sku, k.loc, k.qty, k.qty FROM k, go WHERE go.ok),
idem AS (
    INSERT INTO idempotency (key, method, request_hash, response)
    SELECT $10::text, 'Reserve', $11::bytea, $12::bytea FROM go
    WHERE go.ok AND $10::text IS NOT NULL){outbox}
SELECT g.ok, (SELECT count(*) FROM upd) AS taken, lk.sku, lk.location_id, lk.on_hand,
       lk.reserved, lk.safety, lk.active, i.method, i.request_hash, i.response
FROM go g
LEFT JOIN lk ON NOT g.ok
LEFT JOIN LATERAL (
    SELECT i.method, i.request_hash, i.response FROM idempotency i
    WHERE NOT g.ok AND i.key = $10::text) i ON true
"""
RESERVE_MANY_OUTBOX = """,
ob AS (
    INSERT INTO outbox (kind, payload)
    SELECT 'RESERVATION', jsonb_build_object('reservation_id', $5::text, 'status', 'ACTIVE',
                                             'order_ref', $7::text) FROM go WHERE go.ok)"""

# Commit ($3 true) or release ($3 false) of a whole reservation, one statement: lock the
# reservation (its lines never change after Reserve in the peer, so the statement's snapshot of
# them is current), lock its stock rows in order, give the units back (a commit: off the shelf
# too, with SALE ledger rows), end it. One result row per line, with its ledger row.
# $1 reservation id, $2 key (NULL: none), $3 commit?, $4 the final status.
SETTLE = f"""
WITH r AS MATERIALIZED (
    SELECT r.status, r.channel, r.order_ref, {_MS.format(col="r.created_at")} AS created_ms,
           {_MS.format(col="r.expires_at")} AS expires_ms, r.expires_at <= now() AS due,
           rl.sku, rl.location_id, rl.quantity
    FROM reservations r JOIN reservation_lines rl ON rl.reservation_id = r.id
    WHERE r.id = $1::text AND NOT EXISTS (SELECT 1 FROM idempotency i WHERE i.key = $2::text)
    ORDER BY rl.sku, rl.location_id
    FOR UPDATE OF r),
go AS MATERIALIZED (
    SELECT coalesce(bool_and(r.status = 'ACTIVE' AND NOT r.due), false) AS ok FROM r),
sl AS MATERIALIZED (
    SELECT s.sku FROM stock s JOIN r ON s.sku = r.sku AND s.location_id = r.location_id
    WHERE (SELECT ok FROM go) AND r.quantity > 0
    ORDER BY s.sku, s.location_id
    FOR UPDATE OF s),
st AS (
    UPDATE stock s SET reserved = s.reserved - r.quantity,
           on_hand = s.on_hand - CASE WHEN $3::bool THEN r.quantity ELSE 0 END,
           version = s.version + CASE WHEN $3::bool THEN 1 ELSE 0 END
    FROM r, (SELECT count(*) AS n FROM sl) c
    WHERE c.n > 0 AND s.sku = r.sku AND s.location_id = r.location_id AND r.quantity > 0
    RETURNING s.sku, s.location_id, s.on_hand),
mv AS (
    INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after,
                           reservation_id, order_ref)
    SELECT st.sku, st.location_id, -r.quantity, 'SALE', 'commit', st.on_hand, $1::text,
           r.order_ref
    FROM st JOIN r ON r.sku = st.sku AND r.location_id = st.location_id
    WHERE $3::bool
    ORDER BY st.sku, st.location_id
    RETURNING id, sku, location_id, on_hand_after, {_MS.format(col="created_at")} AS created_ms),
en AS (
    UPDATE reservations SET status = $4::text, ended_at = now()
    WHERE id = $1::text AND (SELECT ok FROM go)
    RETURNING {_MS.format(col="ended_at")} AS ended_ms){{outbox}}
SELECT g.ok, r.status, r.due, r.channel, r.order_ref, r.created_ms, r.expires_ms,
       r.sku, r.location_id, r.quantity, m.id AS m_id, m.on_hand_after, m.created_ms AS m_created,
       (SELECT ended_ms FROM en) AS ended_ms, i.method, i.request_hash, i.response
FROM go g
LEFT JOIN r ON true
LEFT JOIN mv m ON m.sku = r.sku AND m.location_id = r.location_id
LEFT JOIN LATERAL (
    SELECT i.method, i.request_hash, i.response FROM idempotency i
    WHERE NOT g.ok AND i.key = $2::text) i ON true
ORDER BY r.sku, r.location_id
"""
SETTLE_OUTBOX = """,
ob AS (
    INSERT INTO outbox (kind, payload)
    SELECT 'RESERVATION', jsonb_build_object('reservation_id', $1::text, 'status', $4::text,
                                             'order_ref', (SELECT order_ref FROM r LIMIT 1))
    FROM en)"""

IDEMPOTENCY_ROW = "SELECT method, request_hash, response FROM idempotency WHERE key = $1::text"

AVAILABILITY = """
SELECT s.sku, s.location_id, s.on_hand, s.reserved,
       COALESCE(s.safety_stock, l.default_safety_stock) AS safety, s.version
FROM stock s JOIN locations l ON l.id = s.location_id
WHERE s.sku = ANY($1::text[]) AND l.active
"""
AVAILABILITY_AT = """
SELECT s.sku, s.location_id, s.on_hand, s.reserved,
       COALESCE(s.safety_stock, l.default_safety_stock) AS safety, s.version
FROM stock s JOIN locations l ON l.id = s.location_id
WHERE s.sku = ANY($1::text[]) AND s.location_id = ANY($2::text[])
"""

RESERVATION = f"""
SELECT r.status, r.channel, r.order_ref, {_MS.format(col="r.created_at")} AS created_ms,
       {_MS.format(col="r.expires_at")} AS expires_ms,
       coalesce({_MS.format(col="r.ended_at")}, 0) AS ended_ms,
       rl.sku, rl.location_id, rl.quantity
FROM reservations r JOIN reservation_lines rl ON rl.reservation_id = r.id
WHERE r.id = $1::text
ORDER BY rl.sku, rl.location_id
"""

# The sweeper, one transaction a batch: due reservations (skipping those a call holds) end as
# EXPIRED, then their units go back, stock rows locked in order.
EXPIRE_DUE = """
WITH due AS (
    SELECT id FROM reservations WHERE status = 'ACTIVE' AND expires_at <= now()
    ORDER BY expires_at LIMIT $1::int FOR UPDATE SKIP LOCKED)
UPDATE reservations r SET status = 'EXPIRED', ended_at = now() FROM due WHERE r.id = due.id
RETURNING r.id
"""
UNRESERVE = """
WITH q AS (
    SELECT sku, location_id, sum(quantity) AS q FROM reservation_lines
    WHERE reservation_id = ANY($1::text[]) AND quantity > 0 GROUP BY sku, location_id),
lk AS MATERIALIZED (
    SELECT s.sku FROM stock s JOIN q ON q.sku = s.sku AND q.location_id = s.location_id
    ORDER BY s.sku, s.location_id FOR UPDATE OF s)
UPDATE stock s SET reserved = s.reserved - q.q FROM q, (SELECT count(*) AS n FROM lk) c
WHERE c.n > 0 AND s.sku = q.sku AND s.location_id = q.location_id
"""

# ---- set-up calls (not measured): plain transactions --------------------------------------

LOCATION_COLUMNS = (
    "id, name, type, lat, lon, can_ship, can_pickup, active, priority, fixed_cost, cost_per_km,"
    " cost_per_unit, daily_capacity, default_safety_stock"
)
UPSERT_LOCATION = f"""
INSERT INTO locations ({LOCATION_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, type = EXCLUDED.type, lat = EXCLUDED.lat,
    lon = EXCLUDED.lon, can_ship = EXCLUDED.can_ship, can_pickup = EXCLUDED.can_pickup,
    active = EXCLUDED.active, priority = EXCLUDED.priority, fixed_cost = EXCLUDED.fixed_cost,
    cost_per_km = EXCLUDED.cost_per_km, cost_per_unit = EXCLUDED.cost_per_unit,
    daily_capacity = EXCLUDED.daily_capacity,
    default_safety_stock = EXCLUDED.default_safety_stock, updated_at = now()
"""
LIST_LOCATIONS = f"SELECT {LOCATION_COLUMNS} FROM locations ORDER BY id"

# absolute counts: create missing rows (of known locations), lock all in order, write, ledger
CREATE_STOCK = """
INSERT INTO stock (sku, location_id, on_hand, version)
SELECT k.sku, k.loc, 0, 0 FROM unnest($1::text[], $2::text[]) AS k(sku, loc)
JOIN locations l ON l.id = k.loc ORDER BY 1, 2
ON CONFLICT DO NOTHING
"""
LOCK_STOCK = """
SELECT s.sku, s.location_id, s.on_hand, s.reserved, s.version,
       COALESCE(s.safety_stock, l.default_safety_stock) AS safety
FROM unnest($1::text[], $2::text[]) AS k(sku, loc)
JOIN stock s ON s.sku = k.sku AND s.location_id = k.loc
JOIN locations l ON l.id = s.location_id
ORDER BY s.sku, s.location_id FOR UPDATE OF s
"""
WRITE_COUNTS = """
UPDATE stock s SET on_hand = c.on_hand,
       version = s.version + CASE WHEN s.on_hand <> c.on_hand OR s.version = 0 THEN 1 ELSE 0 END,
       safety_stock = CASE WHEN c.set_safety THEN c.safety ELSE s.safety_stock END
FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::int8[])
     AS c(sku, loc, on_hand, set_safety, safety)
WHERE s.sku = c.sku AND s.location_id = c.loc
RETURNING s.sku, s.location_id, s.on_hand, s.reserved, s.version,
          COALESCE(s.safety_stock, (SELECT default_safety_stock FROM locations
                                    WHERE id = s.location_id)) AS safety
"""
ADD_MOVEMENTS = """
INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after)
SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[])
"""
REMEMBER = """
INSERT INTO idempotency (key, method, request_hash, response) VALUES ($1, $2, $3, $4)
"""


def with_outbox(sql: str, cte: str, on: bool) -> str:
    """The statement with its outbox CTE (`--outbox`) or without."""
    return sql.replace("{outbox}", cte if on else "")
