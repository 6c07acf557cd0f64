UPDATE runs SET cancel_requested = TRUE, updated_at = $2
WHERE id = $1 AND status = 'running' AND NOT cancel_requested
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
