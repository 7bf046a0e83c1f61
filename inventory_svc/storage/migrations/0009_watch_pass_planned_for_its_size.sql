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
-- service calls) first counts the queue, up to analyze_at rows. When at least that many changes
-- wait, it analyzes stock_changes, which invalidates the cached plan, and has the pass planned
-- again with nested loops off: a large pass is planned with the queue's real size and with hash
-- joins between its CTEs, whatever else the statistics say. (Checking first whether the
-- statistics were off was not enough: a full suite beside a benchmark still saw a 98k-change
-- pass run for over 77 s, spilling to temporary files.) ANALYZE runs inside a transaction. On a
-- table the service's role does not own it only warns, and the pass goes on.
--
-- Returns what watch_number_pass returns.
ALTER FUNCTION watch_sequence_pass(bigint) RENAME TO watch_number_pass;

CREATE FUNCTION watch_sequence_pass(
    pass_rows bigint, OUT events bigint, OUT first_commit timestamptz, OUT backlog bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    -- below this many changes the worst plan costs a few ms
    analyze_at CONSTANT bigint := 500;
    waiting bigint;
BEGIN
    -- the usual case costs one short index range: fewer than analyze_at changes wait
    SELECT count(*) INTO waiting FROM (SELECT 1 FROM stock_changes ORDER BY id LIMIT analyze_at) s;
    IF waiting >= analyze_at THEN
        -- No nested loop but the LATERAL lookups, which take one index probe per transaction
        -- or SKU: a loop over a CTE is what turned quadratic. SET LOCAL ends with this pass's
        -- transaction; the plan made under it is kept until the next invalidation (the
        -- sequencer's VACUUM of the queue, within 10 s).
        SET LOCAL enable_nestloop = off;
        -- the statistics as they are now, which also invalidates the cached plan: planned again
        ANALYZE stock_changes;
    END IF;
    SELECT p.events, p.first_commit, p.backlog INTO events, first_commit, backlog
    FROM watch_number_pass(pass_rows) p;
END
$$;
