-- Callbacks due at ?1 whose runs have ended, not leased by a live delivery, oldest due first.
SELECT c.run_id
FROM run_callbacks c JOIN runs r ON r.id = c.run_id
WHERE c.state = 'pending' AND c.next_at <= ?1
  AND (c.lease_until IS NULL OR c.lease_until < ?1)
  AND r.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
ORDER BY c.next_at
LIMIT ?2
