-- Records an attempt and its outcome, if $2 still holds the lease: $3 the state, $4 when the
-- next attempt is due, $5 when it was delivered; $6.. the attempt.
WITH held AS (
    UPDATE run_callbacks
    SET attempts = attempts + 1, state = $3, next_at = $4, delivered_at = $5,
        lease_owner = NULL, lease_until = NULL
    WHERE run_id = $1 AND lease_owner = $2
    RETURNING run_id
)
INSERT INTO callback_attempts (run_id, n, at, status_code, error, duration_ms, node)
SELECT run_id, $6, $7, $8, $9, $10, $11 FROM held
