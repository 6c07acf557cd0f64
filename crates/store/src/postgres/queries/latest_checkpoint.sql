SELECT state FROM checkpoints WHERE run_id = $1 ORDER BY seq DESC LIMIT 1
