SELECT seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at FROM runs
WHERE ($1::TEXT IS NULL OR agent = $1)
  AND ($2::TEXT IS NULL OR status = $2)
  AND ($3::TEXT IS NULL OR entrypoint = $3)
  AND ($4::TEXT IS NULL OR concurrency_key = $4)
  AND seq < $5
ORDER BY seq DESC
LIMIT $6
