-- Runs leased now, on every node, per agent (the cluster-wide caps count these; a dead node's
-- runs count until they are requeued, since they may still be running).
SELECT agent, count(*) FROM runs WHERE status = 'running' GROUP BY agent
