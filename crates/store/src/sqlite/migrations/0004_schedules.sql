-- Schedules and their fires. A schedule's `spec` is its ScheduleSpec as JSON (what a client
-- wrote, prepared); the columns beside it are what the store searches and the scheduler moves.
CREATE TABLE schedules (
    id           TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    name         TEXT,
    agent        TEXT NOT NULL,
    spec         TEXT NOT NULL,
    paused       INTEGER NOT NULL DEFAULT 0,
    next_fire_at INTEGER,
    fires        INTEGER NOT NULL DEFAULT 0,
    last_fire_at INTEGER,
    last_run_id  TEXT,
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE UNIQUE INDEX schedules_name ON schedules (owner, name) WHERE name IS NOT NULL;
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0 AND next_fire_at IS NOT NULL;

-- One row per fire. A slot fires once: (schedule, slot) is unique for scheduled fires; manual
-- ones (`trigger`) are not slots.
CREATE TABLE schedule_fires (
    seq         INTEGER PRIMARY KEY,
    schedule_id TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    manual      INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT NOT NULL,
    run_id      TEXT,
    detail      TEXT,
    node        TEXT NOT NULL,
    fired_at    INTEGER NOT NULL
);
CREATE UNIQUE INDEX schedule_fires_slot ON schedule_fires (schedule_id, slot) WHERE manual = 0;
CREATE INDEX schedule_fires_by_schedule ON schedule_fires (schedule_id, seq);
CREATE INDEX schedule_fires_time ON schedule_fires (fired_at);
