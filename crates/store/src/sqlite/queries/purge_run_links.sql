DELETE FROM run_links WHERE run_id = ?1
