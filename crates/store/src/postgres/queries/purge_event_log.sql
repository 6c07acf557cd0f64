-- Trims the log's head: up to $1 entries of runs that are gone (purged), oldest first.
DELETE FROM event_log WHERE (tx, gseq) IN (
    SELECT l.tx, l.gseq FROM event_log l
    WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = l.run_id)
    ORDER BY l.tx, l.gseq
    LIMIT $1
)
