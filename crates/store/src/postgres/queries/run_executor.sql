-- The executor a run named, if any (`docs/executors.md`).
SELECT executor FROM run_links WHERE run_id = $1
