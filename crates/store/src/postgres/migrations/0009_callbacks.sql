-- The callback outbox: one row per run created with a `callback_url`, written by the run's
-- own insert statement, so a callback is never lost between the run and its record. A row is
-- due once its run has ended and `next_at` has passed; a node leases it (SKIP LOCKED) while it
-- delivers, and another takes it over once the lease has run out. Each attempt is kept in
-- callback_attempts.
CREATE TABLE run_callbacks (
    run_id       TEXT PRIMARY KEY,
    url          TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    round_start  INTEGER NOT NULL DEFAULT 0,
    round        INTEGER NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL DEFAULT 0,
    lease_owner  TEXT,
    lease_until  BIGINT,
    delivered_at BIGINT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX run_callbacks_due ON run_callbacks (next_at) WHERE state = 'pending';

CREATE TABLE callback_attempts (
    run_id      TEXT NOT NULL,
    n           INTEGER NOT NULL,
    at          BIGINT NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms BIGINT NOT NULL,
    node        TEXT NOT NULL,
    PRIMARY KEY (run_id, n)
);
