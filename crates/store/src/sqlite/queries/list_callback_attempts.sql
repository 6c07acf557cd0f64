SELECT n, at, status_code, error, duration_ms, node FROM callback_attempts
WHERE run_id = ?1 ORDER BY n
