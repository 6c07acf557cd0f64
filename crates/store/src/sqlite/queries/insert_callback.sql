INSERT INTO run_callbacks (run_id, url, created_at) VALUES (?1, ?2, ?3)
