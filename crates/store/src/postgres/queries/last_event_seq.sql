SELECT coalesce(max(seq), 0)::BIGINT FROM run_events WHERE run_id = $1
