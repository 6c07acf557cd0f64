INSERT INTO callback_attempts (run_id, n, at, status_code, error, duration_ms, node)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
