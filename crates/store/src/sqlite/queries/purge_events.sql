DELETE FROM run_events WHERE run_id = ?1
