-- A node's heartbeat: its load and agents now. No row: another process holds the name now.
UPDATE agentry_nodes
SET running = $3, capacity = $4, agents = $5,
    last_seen = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
WHERE name = $1 AND owner = $2
