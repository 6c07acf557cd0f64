-- Nodes not heard of for a day leave the list (run once per node start).
DELETE FROM agentry_nodes
WHERE last_seen < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT - 86400000
