-- Is a due run of this agent (other than $3) queued? Then a new run must wait its turn.
SELECT 1 FROM runs
WHERE status = 'queued' AND agent = $1 AND run_at <= $2 AND seq <> $3
LIMIT 1
