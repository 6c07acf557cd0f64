-- A schedule after its fires: the next slot, the fires counted, the last fire's slot and run.
UPDATE schedules
SET next_fire_at = ?2, fires = fires + ?3, last_fire_at = coalesce(?4, last_fire_at),
    last_run_id = coalesce(?5, last_run_id), updated_at = ?6, version = version + 1
WHERE id = ?1
RETURNING id, owner, name, agent, spec, paused, next_fire_at, fires, last_fire_at, last_run_id, version, created_at, updated_at
