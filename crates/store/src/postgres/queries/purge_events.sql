DELETE FROM run_events WHERE run_id = ANY($1)
