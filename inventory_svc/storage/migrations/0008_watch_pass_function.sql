-- The WatchStock sequencer's pass (inventory_svc/storage/pg_watch.py explains the order it
-- numbers in) as one function, so a pass is one round trip instead of eight (idle check, BEGIN,
-- lock, SET LOCAL, the statement, the recount, the head's update, NOTIFY, COMMIT): under load
-- each round trip waited its turn on a busy box, and the pass's time is every event's lag.
--
-- Each statement of a VOLATILE function takes its own snapshot (READ COMMITTED), so the numbering
-- statement sees every change committed before the lock was taken, as the separate statements
-- did. Its plan is cached for the session; the plan cache mode is pinned to generic because the
-- pool's connections force custom plans, and planning this statement anew would cost more than
-- running it on a pass of a few rows.
--
-- Returns `events`: the events numbered (0: nothing to number), NULL when another replica's pass
-- holds the lock; `first_commit`: when the earliest change it numbered committed (its lag is the
-- pass's worst); `backlog`: the changes left to number after a pass that took half PASS_ROWS or more
-- (behind, e.g. after a bulk import), else 0 (counted only then: it reads the whole table).
CREATE OR REPLACE FUNCTION watch_sequence_pass(
    pass_rows bigint, OUT events bigint, OUT first_commit timestamptz, OUT backlog bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    after_seq bigint;
    new_last bigint;
    recounted text[];
    notice text;
BEGIN
    -- idle: one index probe, not the big statement
    backlog := 0;
    PERFORM 1 FROM stock_changes ORDER BY id LIMIT 1;
    IF NOT FOUND THEN
        events := 0;
        RETURN;
    END IF;
    SELECT w.last_seq INTO after_seq FROM watch_state w WHERE w.id = 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    WITH txns AS (
        SELECT xid, max(id) AS last_id, count(*) AS n FROM stock_changes GROUP BY xid
    ),
    picked AS (
        SELECT xid FROM (
            SELECT xid, sum(n) OVER (ORDER BY last_id) AS upto,
                   row_number() OVER (ORDER BY last_id) AS k
            FROM txns) w
        WHERE upto <= pass_rows OR k = 1
    ),
    pend AS (
        DELETE FROM stock_changes WHERE xid IN (SELECT xid FROM picked) RETURNING *
    ),
    -- a location's active flag or default safety stock changed: count the SKU totals anew
    reset AS (SELECT EXISTS (SELECT 1 FROM pend WHERE sku = '') AS yes),
    chg AS (SELECT * FROM pend WHERE sku <> ''),
    txn AS (
        SELECT xid, max(id) AS last_id,
               COALESCE(CASE WHEN current_setting('track_commit_timestamp')::bool
                             THEN pg_xact_commit_timestamp(xid(xid)) END,
                        max(changed_at)) AS committed_at
        FROM chg GROUP BY xid
    ),
    num AS (
        SELECT c.*, t.committed_at, after_seq + row_number() OVER (ORDER BY t.last_id, c.id) AS seq
        FROM chg c JOIN txn t USING (xid)
    ),
    -- the ledger rows of those transactions: what moved on_hand, and for which sale. Looked up
    -- transaction by transaction through the xid index (the LATERAL ... OFFSET 0 keeps the
    -- planner from turning it into a hash join): the cached plan cannot know how few
    -- transactions a pass has, and a hash join read the whole ledger every pass (20 ms of a
    -- pass's 21 at 71k movements, measured), growing with the ledger.
    mv AS (
        SELECT t.xid, m.sku, m.location_id, array_agg(DISTINCT m.kind) AS kinds,
               array_remove(array_agg(DISTINCT m.reservation_id), '') AS rids,
               array_remove(array_agg(DISTINCT m.order_ref), '') AS refs
        FROM txn t CROSS JOIN LATERAL (
            SELECT m.sku, m.location_id, m.kind, m.reservation_id, m.order_ref FROM movements m
            WHERE m.xid = t.xid AND m.xid IS NOT NULL OFFSET 0) m
        GROUP BY t.xid, m.sku, m.location_id
    ),
    -- the reservations those transactions made or ended, at the rows they hold (the outbox
    -- looked up as the ledger is, above)
    rs AS (
        SELECT t.xid, rl.sku, rl.location_id, array_agg(DISTINCT o.payload->>'status') AS statuses,
               array_agg(DISTINCT rl.reservation_id) AS rids,
               array_remove(array_agg(DISTINCT r.order_ref), '') AS refs
        FROM txn t CROSS JOIN LATERAL (
            SELECT o.payload FROM outbox o
            WHERE o.xid = t.xid AND o.xid IS NOT NULL AND o.kind = 'RESERVATION' OFFSET 0) o
        JOIN reservation_lines rl ON rl.reservation_id = o.payload->>'reservation_id'
        JOIN reservations r ON r.id = rl.reservation_id
        GROUP BY t.xid, rl.sku, rl.location_id
    ),
    ev AS (
        SELECT n.*, l.active, mv.kinds, rs.statuses,
               CASE WHEN l.active THEN GREATEST(n.on_hand - n.reserved - n.safety, 0)
                    - GREATEST(n.old_on_hand - n.old_reserved - n.old_safety, 0) ELSE 0 END AS d_remote,
               CASE WHEN l.active THEN GREATEST(n.on_hand - n.reserved, 0)
                    - GREATEST(n.old_on_hand - n.old_reserved, 0) ELSE 0 END AS d_pos,
               ARRAY(SELECT DISTINCT x FROM unnest(COALESCE(mv.rids, '{}') || COALESCE(rs.rids, '{}'))
                     AS x ORDER BY x) AS rids,
               ARRAY(SELECT DISTINCT x FROM unnest(COALESCE(mv.refs, '{}') || COALESCE(rs.refs, '{}'))
                     AS x ORDER BY x) AS refs
        FROM num n
        JOIN locations l ON l.id = n.location_id
        LEFT JOIN mv ON mv.xid = n.xid AND mv.sku = n.sku AND mv.location_id = n.location_id
        LEFT JOIN rs ON rs.xid = n.xid AND rs.sku = n.sku AND rs.location_id = n.location_id
    ),
    -- each SKU's available-to-promise after this pass: the kept total moved by this pass's changes,
    -- or (none kept, or a location changed) counted from the stock rows, which this statement sees
    -- exactly as those changes left them
    moved AS (SELECT sku, sum(d_remote) AS d_remote, sum(d_pos) AS d_pos FROM ev GROUP BY sku),
    tot AS (
        SELECT m.sku,
               CASE WHEN a.sku IS NULL OR (SELECT yes FROM reset) THEN c.remote
                    ELSE a.remote + m.d_remote END AS remote,
               CASE WHEN a.sku IS NULL OR (SELECT yes FROM reset) THEN c.pos
                    ELSE a.pos + m.d_pos END AS pos
        FROM moved m
        LEFT JOIN sku_availability a ON a.sku = m.sku
        LEFT JOIN LATERAL (
            SELECT COALESCE(sum(GREATEST(s.on_hand - s.reserved
                                         - COALESCE(s.safety_stock, l.default_safety_stock), 0))
                            FILTER (WHERE l.active), 0) AS remote,
                   COALESCE(sum(GREATEST(s.on_hand - s.reserved, 0)) FILTER (WHERE l.active), 0)
                       AS pos
            FROM stock s JOIN locations l ON l.id = s.location_id
            -- (not counted at all where the kept total is used)
            WHERE s.sku = m.sku AND (a.sku IS NULL OR (SELECT yes FROM reset))) c ON true
    ),
    -- after a change: the SKU's total after the pass, less what the pass's later changes did
    fin AS (
        SELECT ev.*, t.remote - COALESCE(sum(ev.d_remote) OVER w, 0) AS remote_after,
               t.pos - COALESCE(sum(ev.d_pos) OVER w, 0) AS pos_after
        FROM ev JOIN tot t USING (sku)
        WINDOW w AS (PARTITION BY ev.sku ORDER BY ev.seq
                     ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
    ),
    ins AS (
        INSERT INTO stock_events (seq, kind, sku, location_id, on_hand, reserved, safety, d_on_hand,
            d_reserved, version, stock_seq, location_active, sku_remote_before, sku_remote_after,
            sku_pos_before, sku_pos_after, reservation_ids, order_refs, committed_at)
        SELECT seq,
            CASE
                WHEN kinds IS NOT NULL THEN CASE
                    WHEN 'SALE' = ANY(kinds) THEN
                        CASE WHEN reserved < old_reserved THEN 'COMMIT' ELSE 'SALE' END
                    WHEN 'RETURN' = ANY(kinds) THEN 'RETURN'
                    WHEN 'COUNT' = ANY(kinds) THEN 'COUNT'
                    WHEN 'IMPORT' = ANY(kinds) THEN 'IMPORT'
                    WHEN 'TRANSFER_OUT' = ANY(kinds) OR 'TRANSFER_IN' = ANY(kinds) THEN 'TRANSFER'
                    WHEN 'RECEIPT' = ANY(kinds) THEN 'RECEIPT'
                    ELSE 'ADJUSTMENT' END
                WHEN reserved > old_reserved THEN 'RESERVE'
                WHEN reserved < old_reserved THEN
                    CASE WHEN 'EXPIRED' = ANY(statuses) THEN 'EXPIRY' ELSE 'RELEASE' END
                WHEN on_hand <> old_on_hand THEN 'ADJUSTMENT'
                ELSE 'SAFETY_STOCK'
            END,
            sku, location_id, on_hand, reserved, safety, on_hand - old_on_hand,
            reserved - old_reserved, version, stock_seq, active, remote_after - d_remote,
            remote_after, pos_after - d_pos, pos_after, rids, refs, committed_at
        FROM fin
        RETURNING seq
    ),
    keep AS (
        INSERT INTO sku_availability (sku, remote, pos) SELECT sku, remote, pos FROM tot
        ON CONFLICT (sku) DO UPDATE SET remote = EXCLUDED.remote, pos = EXCLUDED.pos
    )
    SELECT (SELECT count(*) FROM ins), (SELECT COALESCE(max(seq), after_seq) FROM ins),
           CASE WHEN (SELECT yes FROM reset) THEN ARRAY(SELECT sku FROM tot) END,
           (SELECT min(committed_at) FROM fin)
    INTO events, new_last, recounted, first_commit;
    IF recounted IS NOT NULL THEN
        -- totals kept for SKUs this pass did not count may be stale now: counted when next
        -- touched
        DELETE FROM sku_availability WHERE sku <> ALL(recounted);
    END IF;
    IF events > 0 THEN
        UPDATE watch_state SET last_seq = new_last WHERE id = 1;
        -- The notice carries the events themselves when they fit (NOTIFY takes < 8000 bytes):
        -- a serving process adds them to its ring without reading them back, a round trip and
        -- a query a pass in every process. "<last seq> <json array of event arrays>", or just
        -- "<last seq>" (read them from stock_events). The columns' order is
        -- storage/pg_watch.py's NOTICE_COLUMNS.
        SELECT json_agg(json_build_array(
                   e.seq, e.kind, e.sku, e.location_id, e.on_hand, e.reserved, e.safety,
                   e.d_on_hand, e.d_reserved, e.version, e.stock_seq, e.location_active,
                   e.sku_remote_before, e.sku_remote_after, e.sku_pos_before, e.sku_pos_after,
                   e.reservation_ids, e.order_refs,
                   (extract(epoch FROM e.committed_at) * 1000000)::bigint,
                   (extract(epoch FROM e.sequenced_at) * 1000000)::bigint) ORDER BY e.seq)::text
        INTO notice
        FROM stock_events e WHERE e.seq > after_seq AND e.seq <= new_last AND events <= 40;
        IF notice IS NULL OR octet_length(notice) > 7900 - 24 THEN
            notice := new_last::text;
        ELSE
            notice := new_last::text || ' ' || notice;
        END IF;
        -- sent at COMMIT, so never before the events can be read
        PERFORM pg_notify('inventory_watch', notice);
    END IF;
    IF events >= pass_rows / 2 THEN
        SELECT count(*) INTO backlog FROM stock_changes;
    END IF;
END
$$;
