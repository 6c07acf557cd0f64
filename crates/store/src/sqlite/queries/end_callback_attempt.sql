-- Records an attempt's outcome, if the caller still holds the lease: ?3 the state, ?4 when the
-- next attempt is due, ?5 when it was delivered. A re-send made meanwhile (the round moved
-- on from ?6) keeps the callback due at once (?7) instead.
UPDATE run_callbacks
SET attempts = attempts + 1,
    state = CASE WHEN round = ?6 THEN ?3 ELSE 'pending' END,
    next_at = CASE WHEN round = ?6 THEN ?4 ELSE ?7 END,
    delivered_at = CASE WHEN round = ?6 THEN ?5 ELSE delivered_at END,
    lease_owner = NULL, lease_until = NULL
WHERE run_id = ?1 AND lease_owner = ?2
