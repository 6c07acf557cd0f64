-- Ends an attempt, fenced by the lease: a node whose lease was taken over changes nothing.
-- A retry ($4 = 'queued') keeps finished_at NULL and moves run_at to the backoff's end.
UPDATE runs
SET status = $4, result = $5, error = $6, finished_at = $7, run_at = coalesce($8, run_at),
    lease_node = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = $9
WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempt = $3
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
