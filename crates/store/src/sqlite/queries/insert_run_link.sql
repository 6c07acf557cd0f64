INSERT INTO run_links (run_id, correlation_id, depth, parent_run_id, executor)
VALUES (?1, ?2, ?3, ?4, ?5)
