-- Runs of one entrypoint leased now, on every node (its max_concurrency counts these; a dead
-- node's runs count until they are requeued, since they may still be running).
SELECT count(*) FROM runs WHERE status = 'running' AND agent = $1 AND entrypoint = $2
