-- Runs by id, for a batch of reads (see batch.rs); ids not found have no row.
SELECT seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at FROM agentry_get_runs($1)
