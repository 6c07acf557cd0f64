SELECT seq, schedule_id, slot, manual, outcome, run_id, detail, node, fired_at
FROM schedule_fires
WHERE schedule_id = $1 AND seq < $2
ORDER BY seq DESC
LIMIT $3
