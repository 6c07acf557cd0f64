-- The global event log (GET /v1/events): every event of every run, in an order every node
-- agrees on and that never fills in behind a reader. An identity column alone would not do:
-- numbers are taken at insert time but become visible at commit, out of order. So each entry
-- also records its transaction (`tx`); entries are ordered by (tx, gseq), and a reader only
-- reads entries of transactions older than the oldest one still running
-- (pg_snapshot_xmin), which can no longer change. Kept by a statement trigger, so no write
-- path (single inserts, batches, functions) can forget it; no index but its key, since it is
-- on the path of every event (purging trims the head instead: purge_event_log.sql).
CREATE TABLE event_log (
    tx     xid8   NOT NULL DEFAULT pg_current_xact_id(),
    gseq   BIGINT GENERATED ALWAYS AS IDENTITY,
    run_id TEXT   NOT NULL,
    seq    BIGINT NOT NULL,
    PRIMARY KEY (tx, gseq)
);
-- Nodes of the old version may still be writing: no event may fall between the backfill and
-- the trigger. The backfill keeps each run's events in their order whatever the nodes' clocks
-- (a running maximum of their times).
LOCK TABLE run_events IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO event_log (run_id, seq)
SELECT run_id, seq FROM run_events
ORDER BY max(at) OVER (PARTITION BY run_id ORDER BY seq), run_id, seq;

CREATE FUNCTION agentry_log_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_log (run_id, seq) SELECT run_id, seq FROM new_events ORDER BY run_id, seq;
    RETURN NULL;
END
$$;
CREATE TRIGGER run_events_logged AFTER INSERT ON run_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION agentry_log_events();
