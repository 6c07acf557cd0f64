-- Attempts' ends (and their starts, when those were not recorded yet) in one round trip, for a
-- whole batch of attempts (see batch.rs): the arrays are parallel, one element per attempt.
-- A function runs its statements in one implicit transaction, each with a fresh snapshot (READ
-- COMMITTED), so the event numbers are taken after the UPDATE holds the runs' row locks and
-- see whatever another node committed before, exactly as when the statements were sent one by
-- one inside BEGIN ... COMMIT. The rules stay in Rust: the caller computes the columns and the
-- events' data. An attempt whose lease is no longer held (fencing) gets no row back.
CREATE FUNCTION agentry_finish_attempts(
    p_ids TEXT[], p_owners TEXT[], p_attempts BIGINT[],
    p_started_at BIGINT[], p_started_data TEXT[],
    p_status TEXT[], p_result TEXT[], p_error TEXT[], p_finished_at BIGINT[], p_run_at BIGINT[],
    p_now BIGINT[], p_kinds TEXT[], p_data TEXT[])
RETURNS TABLE (
    o_seq BIGINT,
    o_id TEXT,
    o_agent TEXT,
    o_entrypoint TEXT,
    o_input TEXT,
    o_status TEXT,
    o_attempt BIGINT,
    o_max_attempts BIGINT,
    o_lease_losses BIGINT,
    o_priority INTEGER,
    o_run_at BIGINT,
    o_timeout_ms BIGINT,
    o_backoff TEXT,
    o_concurrency_key TEXT,
    o_idempotency_key TEXT,
    o_metadata TEXT,
    o_result TEXT,
    o_error TEXT,
    o_cancel_requested BOOLEAN,
    o_lease_owner TEXT,
    o_lease_expires_at BIGINT,
    o_created_at BIGINT,
    o_started_at BIGINT,
    o_finished_at BIGINT,
    o_updated_at BIGINT,
    o_started_seq BIGINT, o_finished_seq BIGINT, o_position BIGINT)
-- Every lookup here goes through an index, whatever the statistics say, and the plans are
-- made once per connection: a plan cached while the tables were still small (a new
-- deployment) would otherwise scan them whole until the next ANALYZE, and planning afresh at
-- every call (PostgreSQL's choice for array parameters) cost more than the writes.
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    done BIGINT[];
BEGIN
    -- Row locks in id order, as every multi-run writer takes them (renewals too): two
    -- batches of one node, or a batch and a renewal, never wait on each other in a cycle.
    PERFORM 1 FROM runs WHERE id = ANY(p_ids) ORDER BY id FOR UPDATE;
    -- Which requests (by position, from 1) ended their attempt: answers are matched by
    -- position, so two attempts of one run in one batch (a stale one still retrying) never
    -- take each other's answer.
    WITH i AS (
        SELECT * FROM unnest(p_ids, p_owners, p_attempts, p_started_at, p_status, p_result,
                             p_error, p_finished_at, p_run_at, p_now) WITH ORDINALITY
            AS t(id, owner, attempt, started_at, status, result, error, finished_at, run_at, now, n)
    ), u AS (
        UPDATE runs r
        SET status = i.status, result = i.result, error = i.error, finished_at = i.finished_at,
            run_at = coalesce(i.run_at, r.run_at), started_at = coalesce(i.started_at, r.started_at),
            lease_node = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = i.now
        FROM i
        WHERE r.id = i.id AND r.status = 'running' AND r.lease_owner = i.owner
          AND r.attempt = i.attempt
        RETURNING i.n
    )
    SELECT array_agg(u.n) INTO done FROM u;
    IF done IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH base AS (
        SELECT t.*, (SELECT coalesce(max(e.seq), 0) FROM run_events e WHERE e.run_id = t.id) AS last
        FROM unnest(p_ids, p_started_at, p_started_data, p_now, p_kinds, p_data) WITH ORDINALITY
            AS t(id, started_at, started_data, now, kind, data, n)
        WHERE t.n = ANY(done)
    ), ins AS (
        INSERT INTO run_events (run_id, seq, kind, data, at)
        SELECT id, last + 1, 'run.started', started_data, started_at
        FROM base WHERE started_at IS NOT NULL
        UNION ALL
        SELECT id, last + CASE WHEN started_at IS NULL THEN 1 ELSE 2 END, kind, data, now
        FROM base
    )
    SELECT r.seq, r.id, r.agent, r.entrypoint, r.input, r.status, r.attempt, r.max_attempts, r.lease_losses, r.priority, r.run_at, r.timeout_ms, r.backoff, r.concurrency_key, r.idempotency_key, r.metadata, r.result, r.error, r.cancel_requested, r.lease_owner, r.lease_expires_at, r.created_at, r.started_at, r.finished_at, r.updated_at,
           CASE WHEN b.started_at IS NULL THEN NULL ELSE b.last + 1 END,
           b.last + CASE WHEN b.started_at IS NULL THEN 1 ELSE 2 END,
           b.n
    FROM base b JOIN runs r ON r.id = b.id
    WHERE r.id = ANY(p_ids);
END
$$;

-- Runs by id, for a batch of reads (see batch.rs), through the primary index whatever the
-- statistics say (as above).
CREATE FUNCTION agentry_get_runs(p_ids TEXT[]) RETURNS SETOF runs
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY SELECT * FROM runs WHERE id = ANY(p_ids);
END
$$;
