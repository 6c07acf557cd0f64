-- The global event log (GET /v1/events): every event of every run, numbered in the order it
-- was committed (one writer: insertion order is commit order). Kept by a trigger, so no
-- write path can forget it; one small row per event and no secondary index, since it is on
-- the path of every event. The rowid is the number: purging never removes the newest entry
-- (see purge_event_log.sql), so numbers are never reused. Events from before it existed are
-- numbered by time.
CREATE TABLE event_log (
    gseq   INTEGER PRIMARY KEY,
    run_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL
);
INSERT INTO event_log (run_id, seq)
SELECT run_id, seq FROM run_events
ORDER BY max(at) OVER (PARTITION BY run_id ORDER BY seq), run_id, seq;
CREATE TRIGGER run_events_logged AFTER INSERT ON run_events
BEGIN
    INSERT INTO event_log (run_id, seq) VALUES (NEW.run_id, NEW.seq);
END;
