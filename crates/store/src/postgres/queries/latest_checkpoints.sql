-- The last checkpoint of each of the runs in $1 that has one: one index lookup per run.
SELECT i.id, c.state FROM unnest($1::TEXT[]) AS i(id)
CROSS JOIN LATERAL (
    SELECT state FROM checkpoints WHERE run_id = i.id ORDER BY seq DESC LIMIT 1
) c
