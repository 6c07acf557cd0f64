-- A trigger's cursor; a trigger seen for the first time starts at the log's end (it fires on
-- what happens from now on, not on history).
INSERT INTO trigger_cursors (name, tx, gseq)
VALUES (?1, 0, (SELECT coalesce(max(gseq), 0) FROM event_log))
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING tx, gseq
