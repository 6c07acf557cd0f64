INSERT INTO schedules (id, owner, name, agent, spec, paused, next_fire_at, fires, last_fire_at, last_run_id, version, created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
