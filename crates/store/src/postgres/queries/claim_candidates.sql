-- Due runs of one agent, by priority then due time then age, locked for this claim; runs other
-- nodes are claiming right now are skipped, not waited for. A run with a concurrency key is a
-- candidate only when no run of that key is running and it is the oldest queued one of its key
-- (checked again under the key's lock, claim_key_free.sql). $4: the agent's entrypoints at
-- their cap (max_concurrency), whose runs stay queued.
SELECT r.id, r.concurrency_key, r.entrypoint FROM runs r
WHERE r.status = 'queued' AND r.agent = $1 AND r.run_at <= $2
  AND NOT (r.entrypoint = ANY($4::TEXT[]))
  AND (r.concurrency_key IS NULL OR (
        NOT EXISTS (SELECT 1 FROM runs o
                    WHERE o.concurrency_key = r.concurrency_key AND o.status = 'running')
    AND NOT EXISTS (SELECT 1 FROM runs o
                    WHERE o.concurrency_key = r.concurrency_key AND o.status = 'queued'
                      AND o.seq < r.seq)))
ORDER BY r.priority DESC, r.run_at, r.seq
LIMIT $3
FOR UPDATE OF r SKIP LOCKED
