-- Event triggers (`docs/triggers.md`). run_links: the chain a run belongs to, its correlation
-- id (given, or inherited from the run whose event triggered it), its depth in the chain, the
-- run that triggered it, and the executor it named; written in the run's own commit, only for
-- runs that have one of these.
CREATE TABLE run_links (
    run_id         TEXT PRIMARY KEY,
    correlation_id TEXT,
    depth          INTEGER NOT NULL DEFAULT 0,
    parent_run_id  TEXT,
    -- The executor the run named (`docs/executors.md`); NULL: the agent's default.
    executor       TEXT
);

-- How far each event trigger has read the global log. Nodes that serve the trigger's agent
-- read from here and only move it forward; runs they create carry an idempotency key of the
-- triggering event, so two nodes reading the same events create each run once.
CREATE TABLE trigger_cursors (
    name TEXT PRIMARY KEY,
    tx   INTEGER NOT NULL,
    gseq INTEGER NOT NULL
);
