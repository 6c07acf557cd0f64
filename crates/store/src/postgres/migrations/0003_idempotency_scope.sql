-- Idempotency keys are scoped to the API key that used them (see SQLite's 0003).
ALTER TABLE runs ADD COLUMN idempotency_scope TEXT NOT NULL DEFAULT '';
DROP INDEX runs_idempotency;
CREATE UNIQUE INDEX runs_idempotency ON runs (idempotency_scope, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
