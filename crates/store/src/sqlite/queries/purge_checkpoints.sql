DELETE FROM checkpoints WHERE run_id = ?1
