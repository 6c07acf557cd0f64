DELETE FROM checkpoints WHERE run_id = ANY($1)
