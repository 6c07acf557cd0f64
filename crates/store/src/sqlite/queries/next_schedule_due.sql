SELECT MIN(next_fire_at) FROM schedules
WHERE paused = 0 AND next_fire_at IS NOT NULL AND agent IN (SELECT value FROM json_each(?1))
