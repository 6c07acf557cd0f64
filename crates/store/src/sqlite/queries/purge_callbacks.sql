DELETE FROM run_callbacks WHERE run_id = ?1
