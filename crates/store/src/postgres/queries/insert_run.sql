-- Stores a batch of new runs (parallel arrays, one element per run; see batch.rs) and their
-- first events (`run.queued`, number 1: the runs are new) in one statement. A run is leased
-- at once to this node ($17, $18) when its caller asked to ($16) and it may skip the queue: it
-- is due, has no concurrency key, and no due run of its agent waits ahead of it (runs of the
-- same batch do not see each other; each waits for none). Such a run has no checkpoint yet.
-- Lease times are on the database's clock (see claim_runs_batch.sql): $19 is the lease's
-- length. $21 is each run's callback URL, whose outbox row is written here too; $22-$25 its
-- chain and named executor (run_links), written for runs that have one.
WITH i AS (
    SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[],
                         $6::INTEGER[], $7::BIGINT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[],
                         $11::TEXT[], $12::TEXT[], $13::TEXT[], $14::BIGINT[], $15::TEXT[],
                         $16::BOOLEAN[], $20::TEXT[], $21::TEXT[], $22::TEXT[],
                         $23::INTEGER[], $24::TEXT[], $25::TEXT[])
        AS t(id, agent, entrypoint, input, max_attempts, priority, run_at, timeout_ms, backoff,
             concurrency_key, idempotency_key, request_hash, metadata, created_at,
             idempotency_scope, claim, queued_data, callback_url, correlation_id, depth,
             parent_run_id, executor)
), d AS (
    SELECT i.*, i.claim AND i.concurrency_key IS NULL AND i.run_at <= i.created_at
       AND NOT EXISTS (SELECT 1 FROM runs o
                       WHERE o.status = 'queued' AND o.agent = i.agent AND o.run_at <= i.run_at)
       AS leased
    FROM i
), r AS (
    INSERT INTO runs (id, agent, entrypoint, input, status, attempt, max_attempts, priority, run_at,
                      timeout_ms, backoff, concurrency_key, idempotency_key, request_hash, metadata,
                      created_at, updated_at, idempotency_scope, lease_node, lease_owner,
                      lease_expires_at)
    SELECT id, agent, entrypoint, input, CASE WHEN leased THEN 'running' ELSE 'queued' END,
           CASE WHEN leased THEN 1 ELSE 0 END, max_attempts, priority, run_at, timeout_ms,
           backoff, concurrency_key, idempotency_key, request_hash, metadata, created_at,
           created_at, idempotency_scope, CASE WHEN leased THEN $17::TEXT END,
           CASE WHEN leased THEN $18::TEXT END,
           CASE WHEN leased THEN (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $19 END
    FROM d
    RETURNING seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at
), e AS (
    INSERT INTO run_events (run_id, seq, kind, data, at)
    SELECT id, 1, 'run.queued', queued_data, created_at FROM d
), c AS (
    INSERT INTO run_callbacks (run_id, url, created_at)
    SELECT id, callback_url, created_at FROM d WHERE callback_url IS NOT NULL
), k AS (
    INSERT INTO run_links (run_id, correlation_id, depth, parent_run_id, executor)
    SELECT id, correlation_id, depth, parent_run_id, executor FROM d
    WHERE correlation_id IS NOT NULL OR depth > 0 OR parent_run_id IS NOT NULL
       OR executor IS NOT NULL
)
SELECT seq, id, agent, entrypoint, input, status, attempt, max_attempts, lease_losses, priority, run_at, timeout_ms, backoff, concurrency_key, idempotency_key, metadata, result, error, cancel_requested, lease_owner, lease_expires_at, created_at, started_at, finished_at, updated_at FROM r
