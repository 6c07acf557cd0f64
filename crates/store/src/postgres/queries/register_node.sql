-- Takes a node name for this process: a new one, one whose holder stopped, one whose holder
-- was silent for $7 ms (its leases have expired), or one held from the same state directory
-- ($8: this process holds that directory's lock, so the holder is dead: a node restarted right
-- after a crash starts at once). A live holder elsewhere keeps it and no row comes back.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT AS now_ms
)
INSERT INTO agentry_nodes AS n (name, owner, home, role, version, agents, capacity, running, started_at, last_seen, stopped_at)
SELECT $1, $2, $8, $3, $4, $5, $6, 0, clock.now_ms, clock.now_ms, NULL FROM clock
ON CONFLICT (name) DO UPDATE
    SET owner = EXCLUDED.owner, home = EXCLUDED.home, role = EXCLUDED.role, version = EXCLUDED.version,
        agents = EXCLUDED.agents, capacity = EXCLUDED.capacity, running = 0,
        started_at = EXCLUDED.started_at, last_seen = EXCLUDED.last_seen, stopped_at = NULL
    WHERE n.owner = EXCLUDED.owner OR n.stopped_at IS NOT NULL
       OR (n.home = EXCLUDED.home AND EXCLUDED.home <> '')
       OR n.last_seen < EXCLUDED.last_seen - $7
RETURNING n.name
