-- The unpaused schedules of these agents (?2, a JSON array) due by ?1, earliest first, with
-- the status of their last fire's run (NULL: none, or deleted by retention).
SELECT s.id, s.owner, s.name, s.agent, s.spec, s.paused, s.next_fire_at, s.fires,
       s.last_fire_at, s.last_run_id, s.version, s.created_at, s.updated_at, r.status
FROM schedules s LEFT JOIN runs r ON r.id = s.last_run_id
WHERE s.paused = 0 AND s.next_fire_at IS NOT NULL AND s.next_fire_at <= ?1
  AND s.agent IN (SELECT value FROM json_each(?2))
ORDER BY s.next_fire_at
LIMIT ?3
