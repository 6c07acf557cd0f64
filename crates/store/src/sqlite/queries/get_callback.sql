SELECT run_id, url, state, attempts, round_start, round, next_at, delivered_at
FROM run_callbacks WHERE run_id = ?1
