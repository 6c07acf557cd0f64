-- Fenced on the attempt the reaper saw: a run claimed again meanwhile is left alone.
UPDATE runs
SET status = $3, lease_losses = lease_losses + 1, error = coalesce($4, error),
    finished_at = $5, lease_node = NULL, lease_owner = NULL, lease_expires_at = NULL,
    run_at = $2, updated_at = $2
WHERE id = $1 AND status = 'running' AND lease_owner = $6 AND attempt = $7
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
