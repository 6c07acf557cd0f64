DELETE FROM callback_attempts WHERE run_id = ?1
