UPDATE runs SET status = 'cancelled', error = $2, finished_at = $3, updated_at = $3
WHERE id = $1 AND status = 'queued'
RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
