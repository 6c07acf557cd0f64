SELECT id, owner, name, agent, spec, paused, next_fire_at, fires, last_fire_at, last_run_id, version, created_at, updated_at FROM schedules WHERE id = $1 FOR UPDATE
