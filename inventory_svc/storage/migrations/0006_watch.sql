-- WatchStock (docs/WATCH.md): every change of a stock row becomes an event whose sequence number
-- follows commit order, kept for a retention window and readable from any replica; and the
-- indexes retention (app/retention.py) deletes old rows by.

-- The transaction that wrote each ledger and outbox row: the sequencer finds what caused a stock
-- change (a sale, a count, an expiry...) among the rows its own transaction wrote. A column
-- default, so no writer changes; rows written before this migration have none (and are never
-- looked up: the sequencer looks only at transactions that committed after it).
ALTER TABLE movements ADD COLUMN xid xid8;
ALTER TABLE movements ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX movements_xid ON movements (xid) WHERE xid IS NOT NULL;
ALTER TABLE outbox ADD COLUMN xid xid8;
ALTER TABLE outbox ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX outbox_xid ON outbox (xid) WHERE xid IS NOT NULL;

-- Changes of stock rows not numbered yet: written by the trigger below inside the writing
-- transaction (so every writer, present or future, is covered and none had to change), moved
-- into stock_events and deleted here by the sequencer. It holds the last few milliseconds of
-- changes (or a bulk import's, until the next pass).
CREATE TABLE stock_changes (
    -- taken under the stock row's lock: for one row, a later change has a larger id
    id           bigserial PRIMARY KEY,
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    sku          text NOT NULL,
    location_id  text NOT NULL,
    on_hand      bigint NOT NULL,
    reserved     bigint NOT NULL,
    safety       bigint NOT NULL,  -- effective: the row's own, else the location's default
    old_on_hand  bigint NOT NULL,
    old_reserved bigint NOT NULL,
    old_safety   bigint NOT NULL,
    version      bigint NOT NULL,
    stock_seq    bigint NOT NULL,  -- stock.seq after the change
    -- the latest change of a transaction is written just before its COMMIT: the commit time's
    -- lower bound when Postgres does not track commit timestamps
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A statement-level trigger with transition tables: one INSERT per UPDATE statement, however
-- many rows it changed (a 10k-row import writes its changes in one statement). Measured in
-- docs/WATCH.md: about +20 us of Postgres time per single-row UPDATE statement, +6 us a row in
-- bulk. An UPDATE that leaves a row as it was (the same on_hand, reserved, safety and version)
-- writes nothing.
CREATE FUNCTION stock_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stock_changes (sku, location_id, on_hand, reserved, safety, old_on_hand,
                               old_reserved, old_safety, version, stock_seq)
    SELECT n.sku, n.location_id, n.on_hand, n.reserved,
           COALESCE(n.safety_stock, l.default_safety_stock), o.on_hand, o.reserved,
           COALESCE(o.safety_stock, l.default_safety_stock), n.version, n.seq
    FROM new_rows n
    JOIN old_rows o ON o.sku = n.sku AND o.location_id = n.location_id
    JOIN locations l ON l.id = n.location_id
    WHERE (n.on_hand, n.reserved, n.safety_stock, n.version)
          IS DISTINCT FROM (o.on_hand, o.reserved, o.safety_stock, o.version);
    RETURN NULL;
END
$$;
CREATE TRIGGER stock_capture_changes AFTER UPDATE ON stock
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stock_capture_changes();

-- A location's active flag or default safety stock changes the availability of every SKU there
-- without an event of its own: a marker row (sku '') in the same pipeline tells the sequencer to
-- count the SKU totals below anew from the stock rows.
CREATE FUNCTION locations_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stock_changes (sku, location_id, on_hand, reserved, safety, old_on_hand,
                               old_reserved, old_safety, version, stock_seq)
    VALUES ('', NEW.id, 0, 0, 0, 0, 0, 0, 0, 0);
    RETURN NULL;
END
$$;
CREATE TRIGGER locations_capture_changes AFTER UPDATE ON locations FOR EACH ROW
    WHEN ((OLD.active, OLD.default_safety_stock) IS DISTINCT FROM
          (NEW.active, NEW.default_safety_stock))
    EXECUTE FUNCTION locations_capture_changes();

-- Each SKU's available-to-promise over every active location, as of the last numbered event,
-- kept by the sequencer (remote channels: safety stock kept back; POS: not). An event moves it
-- by what the change did at its row, so a pass costs a row per SKU, not a row per location of
-- each SKU; a SKU not here, and every SKU after a location marker, is counted from stock.
CREATE TABLE sku_availability (
    sku    text PRIMARY KEY,
    remote bigint NOT NULL,
    pos    bigint NOT NULL
);

-- The stream: one row per change, numbered by the sequencer. Numbers are contiguous (1, 2, 3...)
-- and retention deletes only from the oldest end, so a reader that finds seq N+1 missing after N
-- knows those events were deleted, never that they are still to come.
CREATE TABLE stock_events (
    seq               bigint PRIMARY KEY,
    kind              text NOT NULL,
    sku               text NOT NULL,
    location_id       text NOT NULL,
    on_hand           bigint NOT NULL,
    reserved          bigint NOT NULL,
    safety            bigint NOT NULL,
    d_on_hand         bigint NOT NULL,
    d_reserved        bigint NOT NULL,
    version           bigint NOT NULL,
    stock_seq         bigint NOT NULL,
    location_active   boolean NOT NULL,
    -- the SKU's available-to-promise over every active location before and after this change:
    -- for remote channels (the safety stock kept back) and for POS (not)
    sku_remote_before bigint NOT NULL,
    sku_remote_after  bigint NOT NULL,
    sku_pos_before    bigint NOT NULL,
    sku_pos_after     bigint NOT NULL,
    reservation_ids   text[] NOT NULL DEFAULT '{}',
    order_refs        text[] NOT NULL DEFAULT '{}',
    committed_at      timestamptz NOT NULL,
    sequenced_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- a consumer of a few SKUs catching up from far back reads only theirs
CREATE INDEX stock_events_sku ON stock_events (sku, seq);

-- The sequencer's state: one row, locked by the one pass that runs at a time (any replica).
CREATE TABLE watch_state (
    id       integer PRIMARY KEY CHECK (id = 1),
    last_seq bigint NOT NULL
);
INSERT INTO watch_state VALUES (1, 0);

-- Where the open streams are, one row per serving process (`holder`): retention keeps every
-- event a live cursor still needs. A holder that stops refreshing its row (killed) stops
-- protecting anything once the row is stale.
CREATE TABLE watch_cursors (
    holder     text PRIMARY KEY,
    seq        bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Retention finds old idempotency records by time. BRIN: a few pages for the whole table, and
-- nothing for an insert to maintain (rows arrive in time order), so the hot path pays nothing.
CREATE INDEX idempotency_created ON idempotency USING brin (created_at);
