-- Written under the run's row lock (check_lease.sql), so the next number is ours alone.
INSERT INTO checkpoints (run_id, seq, attempt, state, at)
SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, $4 FROM checkpoints WHERE run_id = $1
RETURNING seq
