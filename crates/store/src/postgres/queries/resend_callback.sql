-- A new round: due now, its attempts counted from here.
UPDATE run_callbacks SET state = 'pending', round_start = attempts, round = round + 1, next_at = $2
WHERE run_id = $1
