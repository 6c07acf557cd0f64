DELETE FROM event_log WHERE run_id = ?1
