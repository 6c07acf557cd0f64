-- Lease times are on the database's clock, so that nodes whose clocks disagree still agree on
-- when a lease expires: the node passes how far from its own now (ms), and the database adds it
-- to its own.
-- Every lease of this node in one statement: the ones still held are extended and reported
-- with their cancel flag; the missing ones were lost.
UPDATE runs r SET lease_expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $4, updated_at = $5
FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS l(id, owner, attempt)
WHERE r.id = l.id AND r.status = 'running' AND r.lease_owner = l.owner AND r.attempt = l.attempt
RETURNING r.id, r.attempt, r.cancel_requested
