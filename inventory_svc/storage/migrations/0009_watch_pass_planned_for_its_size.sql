-- A pass of many changes is planned for its size.
--
-- stock_changes is a queue: most of the time it is empty or holds a few rows, and its statistics
-- are taken then, by the sequencer's own VACUUM of it or autovacuum's (reltuples 0 over a page or
-- more). The planner scales reltuples per page by the table's current size, so with those
-- statistics it estimates a single row however many changes wait, and the pass's plan (cached,
-- generic) joins its CTEs with nested loops. On a 98k-row ImportStock that made one pass take
-- 33 s instead of 0.4 s (measured: quadratic in the changes), longer than any statement timeout
-- the sequencer gives it, so WatchStock stopped.
--
-- The numbering pass of 0008 is kept as watch_number_pass. watch_sequence_pass (the name the
-- service calls) first looks whether the statistics hide a large queue: at least analyze_at
-- changes wait, and more than twice what the statistics promise (scaled to the table's current
-- size, as the planner does; counted up to pass_rows). Then it analyzes stock_changes, which
-- invalidates the cached plan, so the pass is planned again with the queue's real size. (ANALYZE
-- runs inside a transaction. On a table the service's role does not own it only warns, and the
-- pass goes on as before.)
--
-- Returns what watch_number_pass returns.
ALTER FUNCTION watch_sequence_pass(bigint) RENAME TO watch_number_pass;

CREATE FUNCTION watch_sequence_pass(
    pass_rows bigint, OUT events bigint, OUT first_commit timestamptz, OUT backlog bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    -- below this many changes the worst plan costs a few ms: not worth an ANALYZE
    analyze_at CONSTANT bigint := 500;
    waiting bigint;
    estimated double precision;
BEGIN
    -- the usual case costs one short index range: fewer than analyze_at changes wait
    SELECT count(*) INTO waiting FROM (SELECT 1 FROM stock_changes ORDER BY id LIMIT analyze_at) s;
    IF waiting >= analyze_at THEN
        SELECT count(*) INTO waiting FROM (SELECT 1 FROM stock_changes LIMIT pass_rows) s;
        -- what the planner will expect (NULL: no pages, or never analyzed, and it sizes the
        -- table from its pages)
        SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0
                    THEN c.reltuples / c.relpages
                         * (pg_relation_size(c.oid) / current_setting('block_size')::bigint)
               END
        INTO estimated
        FROM pg_class c WHERE c.oid = 'stock_changes'::regclass;
        IF estimated < waiting / 2 THEN
            ANALYZE stock_changes;
        END IF;
    END IF;
    SELECT p.events, p.first_commit, p.backlog INTO events, first_commit, backlog
    FROM watch_number_pass(pass_rows) p;
END
$$;
