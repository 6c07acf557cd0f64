-- Due runs of one agent, by priority then due time then age. A run with a concurrency key is a
-- candidate only when no run of that key is running and it is the oldest queued one of its key,
-- so runs of one key run one at a time, in enqueue order. ?4: a JSON array of the agent's
-- entrypoints at their cap (max_concurrency), whose runs stay queued.
SELECT r.id, r.entrypoint FROM runs r
WHERE r.status = 'queued' AND r.agent = ?1 AND r.run_at <= ?2
  AND r.entrypoint NOT IN (SELECT value FROM json_each(?4))
  AND (r.concurrency_key IS NULL OR (
        NOT EXISTS (SELECT 1 FROM runs o
                    WHERE o.concurrency_key = r.concurrency_key AND o.status = 'running')
    AND NOT EXISTS (SELECT 1 FROM runs o
                    WHERE o.concurrency_key = r.concurrency_key AND o.status = 'queued'
                      AND o.seq < r.seq)))
ORDER BY r.priority DESC, r.run_at, r.seq
LIMIT ?3
