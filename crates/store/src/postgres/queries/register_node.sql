-- Takes a node name for this process ($8: its home, $9: its lease TTL in ms): a new name, one
-- whose holder stopped, this process's own, one held from the same home (this process holds
-- that state directory's lock, so the holder is dead: a node restarted right after a crash
-- starts at once), or one whose holder has been silent for the longer of both TTLs with no
-- unexpired lease left under the name. A live holder elsewhere keeps it: no row comes back.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT AS now_ms
)
INSERT INTO agentry_nodes AS n (name, owner, home, lease_ttl_ms, role, version, agents, capacity, running, started_at, last_seen, stopped_at)
SELECT $1, $2, $8, $9, $3, $4, $5, $6, 0, clock.now_ms, clock.now_ms, NULL FROM clock
ON CONFLICT (name) DO UPDATE
    SET owner = EXCLUDED.owner, home = EXCLUDED.home, lease_ttl_ms = EXCLUDED.lease_ttl_ms,
        role = EXCLUDED.role, version = EXCLUDED.version,
        agents = EXCLUDED.agents, capacity = EXCLUDED.capacity, running = 0,
        started_at = EXCLUDED.started_at, last_seen = EXCLUDED.last_seen, stopped_at = NULL
    WHERE n.owner = EXCLUDED.owner OR n.stopped_at IS NOT NULL
       OR (n.home = EXCLUDED.home AND EXCLUDED.home <> '')
       OR (n.last_seen < EXCLUDED.last_seen - greatest(n.lease_ttl_ms, $7)
           AND NOT EXISTS (SELECT 1 FROM runs r
                           WHERE r.lease_node = $1 AND r.status = 'running'
                             AND r.lease_expires_at >= EXCLUDED.last_seen))
RETURNING n.name
