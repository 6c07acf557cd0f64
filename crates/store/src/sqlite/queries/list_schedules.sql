-- ?2: a JSON array of agent ids, or NULL for every agent.
SELECT id, owner, name, agent, spec, paused, next_fire_at, fires, last_fire_at, last_run_id, version, created_at, updated_at FROM schedules
WHERE id > ?1 AND (?2 IS NULL OR agent IN (SELECT value FROM json_each(?2)))
ORDER BY id
LIMIT ?3
