-- Leases to $2 until $3 up to $4 callbacks due at $1 whose runs have ended (rows another node
-- holds locked are skipped, not waited for), oldest due first.
WITH due AS (
    SELECT c.run_id FROM run_callbacks c JOIN runs r ON r.id = c.run_id
    WHERE c.state = 'pending' AND c.next_at <= $1
      AND (c.lease_until IS NULL OR c.lease_until < $1)
      AND r.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
    ORDER BY c.next_at
    LIMIT $4
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE run_callbacks c SET lease_owner = $2, lease_until = $3
FROM due WHERE c.run_id = due.run_id
RETURNING c.run_id, c.url, c.state, c.attempts, c.round_start, c.next_at, c.delivered_at
