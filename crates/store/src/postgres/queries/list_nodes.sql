-- Every registered node, with the database's now to judge which are silent.
SELECT name, owner, role, version, agents, capacity, running, started_at, last_seen, stopped_at,
       (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT AS now_ms
FROM agentry_nodes
ORDER BY name
