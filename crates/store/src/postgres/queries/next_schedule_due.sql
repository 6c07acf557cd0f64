SELECT MIN(next_fire_at) FROM schedules
WHERE NOT paused AND next_fire_at IS NOT NULL AND agent = ANY($1)
