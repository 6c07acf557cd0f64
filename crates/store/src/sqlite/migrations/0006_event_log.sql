-- The global event log (GET /v1/events): every event of every run, numbered in the order it
-- was committed (one writer: insertion order is commit order). Kept by a trigger, so no
-- write path can forget it. Events from before it existed are numbered by time.
CREATE TABLE event_log (
    gseq   INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL
);
CREATE INDEX event_log_run ON event_log (run_id);
INSERT INTO event_log (run_id, seq) SELECT run_id, seq FROM run_events ORDER BY at, run_id, seq;
CREATE TRIGGER run_events_logged AFTER INSERT ON run_events
BEGIN
    INSERT INTO event_log (run_id, seq) VALUES (NEW.run_id, NEW.seq);
END;
