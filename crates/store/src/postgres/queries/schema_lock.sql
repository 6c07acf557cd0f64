-- Held until the schema transaction ends: nodes starting together create the schema one at a
-- time (concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalogue).
SELECT pg_advisory_xact_lock(hashtext('agentry_schema'))
