-- The global log after ($1, $2), the next $3 events of transactions that have all ended
-- (older than the oldest still running), with each event's run's agent, entrypoint and chain (run_links).
SELECT l.tx::text::bigint AS tx, l.gseq, e.run_id, e.seq, e.kind, e.data, e.at, r.agent,
       r.entrypoint, k.correlation_id, coalesce(k.depth, 0)
FROM event_log l
JOIN run_events e ON e.run_id = l.run_id AND e.seq = l.seq
JOIN runs r ON r.id = l.run_id
LEFT JOIN run_links k ON k.run_id = l.run_id
WHERE (l.tx, l.gseq) > ($1::text::xid8, $2)
  AND l.tx < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY l.tx, l.gseq
LIMIT $3
