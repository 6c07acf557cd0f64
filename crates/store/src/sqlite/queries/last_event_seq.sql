SELECT coalesce(max(seq), 0) FROM run_events WHERE run_id = ?1
