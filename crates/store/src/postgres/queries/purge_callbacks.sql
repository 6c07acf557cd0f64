WITH a AS (DELETE FROM callback_attempts WHERE run_id = ANY($1))
DELETE FROM run_callbacks WHERE run_id = ANY($1)
