-- Which state directory (on which machine) each node runs from, and its lease TTL: a process
-- holding that directory's lock may take over the name of a holder that died at once; any
-- other waits until the holder has been silent for the longer of both TTLs and no lease under
-- the name is still unexpired.
ALTER TABLE agentry_nodes ADD COLUMN home TEXT NOT NULL DEFAULT '';
ALTER TABLE agentry_nodes ADD COLUMN lease_ttl_ms BIGINT NOT NULL DEFAULT 0;
