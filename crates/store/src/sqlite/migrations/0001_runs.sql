-- Durable runs, their event logs and checkpoints. Times are Unix milliseconds.

CREATE TABLE runs (
    seq              INTEGER PRIMARY KEY,      -- storage order: list cursor, FIFO tie-break
    id               TEXT    NOT NULL UNIQUE,  -- run_<uuidv7>
    agent            TEXT    NOT NULL,
    entrypoint       TEXT    NOT NULL,
    input            TEXT    NOT NULL,         -- JSON object: keyword arguments
    status           TEXT    NOT NULL,         -- queued running succeeded failed timed_out cancelled
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    lease_losses     INTEGER NOT NULL DEFAULT 0,
    priority         INTEGER NOT NULL DEFAULT 0,
    run_at           INTEGER NOT NULL,         -- due time (creation, delay, or retry backoff)
    timeout_ms       INTEGER NOT NULL,
    backoff          TEXT    NOT NULL,         -- JSON {base, max_s, jitter}
    concurrency_key  TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    metadata         TEXT    NOT NULL,
    result           TEXT,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_node       TEXT,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL
);

-- The dispatcher's scan: queued runs of one agent by priority, then due time, then age.
CREATE INDEX runs_due ON runs (agent, priority DESC, run_at, seq) WHERE status = 'queued';
-- The earliest future run, to sleep exactly until it is due.
CREATE INDEX runs_queued_at ON runs (run_at) WHERE status = 'queued';
-- One running run per concurrency key, the others in enqueue order.
CREATE INDEX runs_concurrency ON runs (concurrency_key, status, seq) WHERE concurrency_key IS NOT NULL;
-- The reaper: running runs by lease expiry.
CREATE INDEX runs_lease ON runs (lease_expires_at) WHERE status = 'running';
-- Retention.
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX runs_idempotency ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The run list's filters.
CREATE INDEX runs_status ON runs (status, seq);
CREATE INDEX runs_agent ON runs (agent, seq);

CREATE TABLE run_events (
    run_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL,  -- 1, 2, 3, ... per run, without gaps: the SSE event id
    kind   TEXT    NOT NULL,
    data   TEXT    NOT NULL,  -- JSON
    at     INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    run_id  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state   TEXT    NOT NULL,  -- JSON
    at      INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
