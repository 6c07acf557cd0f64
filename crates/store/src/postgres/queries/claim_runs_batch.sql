-- Lease times are on the database's clock, so that nodes whose clocks disagree still agree on
-- when a lease expires: the node passes how far from its own now (ms), and the database adds it
-- to its own.
-- Leases the queued runs in $1 at once (locked by claim_candidates.sql in this transaction).
UPDATE runs
SET status = 'running', attempt = attempt + 1, lease_node = $2, lease_owner = $3,
    lease_expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $4, started_at = NULL, updated_at = $5
WHERE id = ANY($1) AND status = 'queued'
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
