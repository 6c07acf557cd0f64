-- The attempt's code started: fenced by the lease, like every write of a running attempt.
UPDATE runs SET started_at = $4, updated_at = $4
WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempt = $3
RETURNING id
