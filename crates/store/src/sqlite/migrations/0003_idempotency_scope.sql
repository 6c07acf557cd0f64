-- Idempotency keys are scoped to the API key that used them: one tenant's key can neither read
-- nor squat another's runs. Runs stored before have the empty scope (authentication off).
ALTER TABLE runs ADD COLUMN idempotency_scope TEXT NOT NULL DEFAULT '';
DROP INDEX runs_idempotency;
CREATE UNIQUE INDEX runs_idempotency ON runs (idempotency_scope, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
