UPDATE run_callbacks SET lease_owner = ?2, lease_until = ?3 WHERE run_id = ?1
RETURNING run_id, url, state, attempts, round_start, round, next_at, delivered_at
