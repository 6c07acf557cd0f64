-- A trigger's cursor; a trigger seen for the first time starts at the log's end (it fires on
-- what happens from now on, not on history): past every transaction that has ended (see
-- log_after.sql: later ones all have a greater transaction id).
INSERT INTO trigger_cursors (name, tx, gseq)
VALUES ($1, greatest(pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1, 0),
        9223372036854775807)
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING tx, gseq
