-- Replaces a schedule read at version $11; nothing when it changed meanwhile.
UPDATE schedules
SET name = $2, agent = $3, spec = $4, paused = $5, next_fire_at = $6, fires = $7,
    last_fire_at = $8, last_run_id = $9, updated_at = $10, version = version + 1
WHERE id = $1 AND version = $11
RETURNING id, owner, name, agent, spec, paused, next_fire_at, fires, last_fire_at, last_run_id, version, created_at, updated_at
