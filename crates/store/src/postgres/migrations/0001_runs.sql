-- Durable runs, their event logs and checkpoints (PostgreSQL; the same tables as SQLite's
-- 0001_runs.sql). Times are Unix milliseconds.

CREATE TABLE runs (
    seq              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- storage order
    id               TEXT    NOT NULL UNIQUE,  -- run_<uuidv7>
    agent            TEXT    NOT NULL,
    entrypoint       TEXT    NOT NULL,
    input            TEXT    NOT NULL,         -- JSON object: keyword arguments
    status           TEXT    NOT NULL,         -- queued running succeeded failed timed_out cancelled
    attempt          BIGINT  NOT NULL DEFAULT 0,
    max_attempts     BIGINT  NOT NULL,
    lease_losses     BIGINT  NOT NULL DEFAULT 0,
    priority         INTEGER NOT NULL DEFAULT 0,
    run_at           BIGINT  NOT NULL,         -- due time (creation, delay, or retry backoff)
    timeout_ms       BIGINT  NOT NULL,
    backoff          TEXT    NOT NULL,         -- JSON {base, max_s, jitter}
    concurrency_key  TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    metadata         TEXT    NOT NULL,
    result           TEXT,
    error            TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    lease_node       TEXT,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    created_at       BIGINT  NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT  NOT NULL
);

CREATE INDEX runs_due ON runs (agent, priority DESC, run_at, seq) WHERE status = 'queued';
CREATE INDEX runs_queued_at ON runs (run_at) WHERE status = 'queued';
CREATE INDEX runs_concurrency ON runs (concurrency_key, status, seq) WHERE concurrency_key IS NOT NULL;
CREATE INDEX runs_lease ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX runs_idempotency ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_status ON runs (status, seq);
CREATE INDEX runs_agent ON runs (agent, seq);

CREATE TABLE run_events (
    run_id TEXT   NOT NULL,
    seq    BIGINT NOT NULL,  -- 1, 2, 3, ... per run, without gaps: the SSE event id
    kind   TEXT   NOT NULL,
    data   TEXT   NOT NULL,  -- JSON
    at     BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE checkpoints (
    run_id  TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    state   TEXT   NOT NULL,  -- JSON
    at      BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
