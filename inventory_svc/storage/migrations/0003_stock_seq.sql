-- Every change to a stock row takes a new number from one sequence. Redis keeps, per
-- SKU-location, the committed values with the number they came with and takes a value only if
-- its number is newer: concurrent commits then reach Redis in Postgres' order whatever order
-- their updates arrive in (DESIGN I4), and a read from Redis is always one committed state.
-- `version` stays as it was: it moves only with on_hand and guards counts (SetStock's CAS).
CREATE SEQUENCE stock_seq;
ALTER TABLE stock ADD COLUMN seq bigint NOT NULL DEFAULT nextval('stock_seq');

-- A trigger rather than `seq = nextval(...)` in each UPDATE: a write path that forgot it would
-- leave Redis with an old value that no later update could replace.
CREATE FUNCTION stock_next_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.seq := nextval('stock_seq');
    RETURN NEW;
END
$$;
CREATE TRIGGER stock_next_seq BEFORE UPDATE ON stock FOR EACH ROW EXECUTE FUNCTION stock_next_seq();

-- Redis values built before this migration have no seq: a new generation makes every replica
-- rebuild Redis from Postgres at start.
UPDATE meta SET value = md5(random()::text || clock_timestamp()::text) WHERE key = 'generation';
