-- The next sequence number of the run's log; the writer is the only one appending.
INSERT INTO run_events (run_id, seq, kind, data, at)
SELECT ?1, ifnull(max(seq), 0) + 1, ?2, ?3, ?4 FROM run_events WHERE run_id = ?1
RETURNING seq
