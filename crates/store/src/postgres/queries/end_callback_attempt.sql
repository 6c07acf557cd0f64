-- Records an attempt and its outcome, if $2 still holds the lease: $3 the state, $4 when the
-- next attempt is due, $5 when it was delivered; $6.. the attempt. A re-send made meanwhile
-- (the round moved on from $12) keeps the callback due at once instead.
WITH held AS (
    UPDATE run_callbacks
    SET attempts = attempts + 1,
        state = CASE WHEN round = $12 THEN $3 ELSE 'pending' END,
        next_at = CASE WHEN round = $12 THEN $4 ELSE $7 END,
        delivered_at = CASE WHEN round = $12 THEN $5 ELSE delivered_at END,
        lease_owner = NULL, lease_until = NULL
    WHERE run_id = $1 AND lease_owner = $2
    RETURNING run_id
)
INSERT INTO callback_attempts (run_id, n, at, status_code, error, duration_ms, node)
SELECT run_id, $6, $7, $8, $9, $10, $11 FROM held
