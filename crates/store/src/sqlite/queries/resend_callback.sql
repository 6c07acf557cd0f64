-- A new round: due now, its attempts counted from here; a delivery in flight keeps its lease.
UPDATE run_callbacks SET state = 'pending', round_start = attempts, round = round + 1, next_at = ?2,
    delivered_at = CASE WHEN state = 'delivered' THEN delivered_at END
WHERE run_id = ?1
