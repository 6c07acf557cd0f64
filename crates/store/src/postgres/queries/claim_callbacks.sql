-- Leases to $2 for $3 ms, on the database's clock (nodes' clocks may differ), up to $4
-- callbacks due whose runs have ended (rows another node holds locked are skipped, not waited
-- for), oldest due first. $1, the node's clock, is not used: the database's decides.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT AS now, $1::BIGINT AS node_now
), due AS (
    SELECT c.run_id FROM run_callbacks c JOIN runs r ON r.id = c.run_id, clock
    WHERE c.state = 'pending' AND c.next_at <= clock.now
      AND (c.lease_until IS NULL OR c.lease_until < clock.now)
      AND r.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
    ORDER BY c.next_at
    LIMIT $4
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE run_callbacks c SET lease_owner = $2, lease_until = (SELECT now FROM clock) + $3
FROM due WHERE c.run_id = due.run_id
RETURNING c.run_id, c.url, c.state, c.attempts, c.round_start, c.round, c.next_at, c.delivered_at
