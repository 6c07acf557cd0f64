-- Leases a run just created, in the same transaction, unless a due run of its agent is queued
-- ahead of it (then it waits its turn). It has no checkpoint yet.
-- Lease times are on the database's clock (see claim_runs_batch.sql): $4 is the lease's length.
UPDATE runs
SET status = 'running', attempt = attempt + 1, lease_node = $2, lease_owner = $3,
    lease_expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $4,
    started_at = NULL, updated_at = $5
WHERE id = $1 AND status = 'queued'
  AND NOT EXISTS (SELECT 1 FROM runs o
                  WHERE o.status = 'queued' AND o.agent = $6 AND o.run_at <= $7 AND o.seq <> $8)
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
