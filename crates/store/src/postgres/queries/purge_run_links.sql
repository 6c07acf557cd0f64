DELETE FROM run_links WHERE run_id = ANY($1)
