-- Fencing, and the run's row lock: every event of a run is written under it, so its numbers
-- never collide whichever node writes.
SELECT 1 FROM runs WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempt = $3
FOR UPDATE
