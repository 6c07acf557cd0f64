-- The next sequence number of the run's log. Every writer holds the run's row lock (it updated
-- the row, or check_lease.sql locked it), so two nodes never take the same number.
INSERT INTO run_events (run_id, seq, kind, data, at)
SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, $4 FROM run_events WHERE run_id = $1
RETURNING seq
