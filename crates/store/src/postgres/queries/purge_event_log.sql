DELETE FROM event_log WHERE run_id = ANY($1)
