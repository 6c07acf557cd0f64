-- A run's links: its chain (`docs/triggers.md`) and the executor it named (`docs/executors.md`).
SELECT correlation_id, depth, parent_run_id, executor FROM run_links WHERE run_id = ?1
