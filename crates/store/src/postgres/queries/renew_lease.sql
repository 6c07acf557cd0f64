-- Every lease of this node in one statement: the ones still held are extended and reported
-- with their cancel flag; the missing ones were lost.
UPDATE runs r SET lease_expires_at = $4, updated_at = $5
FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS l(id, owner, attempt)
WHERE r.id = l.id AND r.status = 'running' AND r.lease_owner = l.owner AND r.attempt = l.attempt
RETURNING r.id, r.attempt, r.cancel_requested
