-- Runs of one entrypoint leased now (its max_concurrency counts these).
SELECT count(*) FROM runs WHERE status = 'running' AND agent = ?1 AND entrypoint = ?2
