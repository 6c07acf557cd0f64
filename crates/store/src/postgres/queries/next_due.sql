SELECT min(run_at) FROM runs WHERE status = 'queued' AND run_at > $1
