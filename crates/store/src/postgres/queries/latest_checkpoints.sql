-- The last checkpoint of each of the runs in $1 that has one.
SELECT DISTINCT ON (run_id) run_id, state FROM checkpoints
WHERE run_id = ANY($1)
ORDER BY run_id, seq DESC
