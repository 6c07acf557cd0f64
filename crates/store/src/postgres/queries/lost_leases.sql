-- Expiry is judged on the database's clock, so that nodes whose clocks disagree still agree on
-- when a lease expires (the leases were written on it too).
-- Running runs whose node is gone: the lease expired, or it is this node's previous life.
-- Locked for this reaper; rows another reaper is handling are skipped. At most 500 a round:
-- the reaper comes back for the rest, and no transaction holds thousands of row locks.
SELECT seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at FROM runs
WHERE status = 'running'
  AND (lease_expires_at < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
       OR (lease_node = $1 AND lease_owner <> $2))
LIMIT 500 -- LOST_PER_ROUND
FOR UPDATE SKIP LOCKED
