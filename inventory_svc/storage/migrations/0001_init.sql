-- Source of truth for stock, reservations, the ledger, idempotency records and the outbox.
-- Invariants (DESIGN.md §3): I1 by CHECK on stock; I2 and I3 kept by the service in one
-- transaction per change, verified by tests/invariants.py.

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
-- The generation tells a Redis that was built from this database from one that was not.
INSERT INTO meta (key, value) VALUES ('generation', md5(random()::text || clock_timestamp()::text));

CREATE TABLE locations (
    id                   text PRIMARY KEY,
    name                 text NOT NULL DEFAULT '',
    type                 text NOT NULL CHECK (type IN ('WAREHOUSE', 'STORE')),
    lat                  double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon                  double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    can_ship             boolean NOT NULL,
    can_pickup           boolean NOT NULL,
    active               boolean NOT NULL,
    priority             integer NOT NULL,
    fixed_cost           double precision NOT NULL CHECK (fixed_cost >= 0),
    cost_per_km          double precision NOT NULL CHECK (cost_per_km >= 0),
    cost_per_unit        double precision NOT NULL CHECK (cost_per_unit >= 0),
    daily_capacity       integer NOT NULL CHECK (daily_capacity >= 0),
    default_safety_stock bigint NOT NULL CHECK (default_safety_stock >= 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stock (
    sku          text NOT NULL,
    location_id  text NOT NULL REFERENCES locations (id),
    on_hand      bigint NOT NULL,
    reserved     bigint NOT NULL DEFAULT 0,
    safety_stock bigint CHECK (safety_stock >= 0),   -- NULL: the location's default
    version      bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (sku, location_id),
    CONSTRAINT stock_reserved_within_on_hand CHECK (0 <= reserved AND reserved <= on_hand)
);
CREATE INDEX stock_location ON stock (location_id);

CREATE TABLE reservations (
    id         text PRIMARY KEY,
    status     text NOT NULL CHECK (status IN ('ACTIVE', 'COMMITTED', 'RELEASED', 'EXPIRED')),
    channel    text NOT NULL,
    order_ref  text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    ended_at   timestamptz,
    CHECK ((status = 'ACTIVE') = (ended_at IS NULL))
);
-- The sweeper's queue: only ACTIVE rows, by expiry.
CREATE INDEX reservations_due ON reservations (expires_at) WHERE status = 'ACTIVE';
CREATE INDEX reservations_order_ref ON reservations (order_ref) WHERE order_ref <> '';

CREATE TABLE reservation_lines (
    reservation_id text NOT NULL REFERENCES reservations (id),
    sku            text NOT NULL,
    location_id    text NOT NULL,
    quantity       bigint NOT NULL CHECK (quantity >= 0),  -- still held (ACTIVE) or as it ended
    requested      bigint NOT NULL CHECK (requested > 0),
    PRIMARY KEY (reservation_id, sku, location_id)
);
CREATE INDEX reservation_lines_stock ON reservation_lines (sku, location_id);

CREATE TABLE movements (
    id             bigserial PRIMARY KEY,
    sku            text NOT NULL,
    location_id    text NOT NULL,
    delta          bigint NOT NULL CHECK (delta <> 0),
    kind           text NOT NULL,
    reason         text NOT NULL DEFAULT '',
    on_hand_after  bigint NOT NULL,
    reservation_id text NOT NULL DEFAULT '',
    order_ref      text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX movements_stock ON movements (sku, location_id, id);
CREATE INDEX movements_order_ref ON movements (order_ref, id) WHERE order_ref <> '';
CREATE INDEX movements_reservation ON movements (reservation_id, id) WHERE reservation_id <> '';

CREATE TABLE idempotency (
    key          text PRIMARY KEY,
    method       text NOT NULL,
    request_hash bytea NOT NULL,
    response     bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Stock events, written in the same transaction as the change; a relay publishes them later.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    sku         text NOT NULL DEFAULT '',
    location_id text NOT NULL DEFAULT '',
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
