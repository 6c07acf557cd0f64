-- The global log after ?1, the next ?2 events, with each event's run's agent, entrypoint and chain (run_links).
SELECT l.gseq, e.run_id, e.seq, e.kind, e.data, e.at, r.agent, r.entrypoint, k.correlation_id,
       coalesce(k.depth, 0)
FROM event_log l
JOIN run_events e ON e.run_id = l.run_id AND e.seq = l.seq
JOIN runs r ON r.id = l.run_id
LEFT JOIN run_links k ON k.run_id = l.run_id
WHERE l.gseq > ?1
ORDER BY l.gseq
LIMIT ?2
