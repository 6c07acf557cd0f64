-- Trims the log's head: up to ?1 entries of runs that are gone (purged), oldest first,
-- never the newest entry (its number is the next one's base).
DELETE FROM event_log WHERE gseq IN (
    SELECT l.gseq FROM event_log l
    WHERE l.gseq < (SELECT max(gseq) FROM event_log)
      AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = l.run_id)
    ORDER BY l.gseq
    LIMIT ?1
)
