-- Stores a new run and its first event (`run.queued`, number 1: the run is new) in one
-- statement.
WITH r AS (
    INSERT INTO runs (id, agent, entrypoint, input, status, max_attempts, priority, run_at, timeout_ms,
                      backoff, concurrency_key, idempotency_key, request_hash, metadata, created_at,
                      updated_at, idempotency_scope)
    VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15)
    RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
), e AS (
    INSERT INTO run_events (run_id, seq, kind, data, at)
    SELECT id, 1, 'run.queued', $16, $14 FROM r
)
SELECT seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at FROM r
