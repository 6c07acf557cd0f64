-- Ends a batch of attempts, each fenced by its lease: a node whose lease was taken over
-- changes nothing (no row for that attempt). A retry (status 'queued') keeps finished_at NULL
-- and moves run_at to the backoff's end. An attempt's start (NULL when already recorded) is
-- written in the same call, with its `run.started` event. Columns: the run's, in the usual
-- order, then the two events' numbers and the request's position in the batch (from 1). See migrations/0006_batches.sql.
SELECT * FROM agentry_finish_attempts($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
