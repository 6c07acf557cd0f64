-- A graceful shutdown: the node's runs were handed back.
UPDATE agentry_nodes
SET running = 0, stopped_at = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
WHERE name = $1 AND owner = $2
