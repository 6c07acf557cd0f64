-- A batch of notifications to the other nodes (channel, payload pairs), sent after the writes
-- they announce have committed.
SELECT count(pg_notify(c, p)) FROM unnest($1::TEXT[], $2::TEXT[]) AS t(c, p)
