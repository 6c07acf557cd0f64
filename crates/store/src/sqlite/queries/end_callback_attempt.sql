-- Records an attempt's outcome, if the caller still holds the lease: ?3 the state, ?4 when the
-- next attempt is due, ?5 when it was delivered.
UPDATE run_callbacks
SET attempts = attempts + 1, state = ?3, next_at = ?4, delivered_at = ?5,
    lease_owner = NULL, lease_until = NULL
WHERE run_id = ?1 AND lease_owner = ?2
