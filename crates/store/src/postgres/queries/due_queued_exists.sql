-- Whether a due run of the agent waits in the queue (a claim held back by a cluster cap asks,
-- to know whether to look again soon).
SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'queued' AND agent = $1 AND run_at <= $2)
