-- Schedules and their fires (as on SQLite). A schedule's `spec` is its ScheduleSpec as JSON;
-- the columns beside it are what the store searches and the scheduler moves. Nodes firing
-- together lock due schedules FOR UPDATE SKIP LOCKED; (schedule, slot) is unique besides.
CREATE TABLE schedules (
    id           TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    name         TEXT,
    agent        TEXT NOT NULL,
    spec         TEXT NOT NULL,
    paused       BOOLEAN NOT NULL DEFAULT FALSE,
    next_fire_at BIGINT,
    fires        BIGINT NOT NULL DEFAULT 0,
    last_fire_at BIGINT,
    last_run_id  TEXT,
    version      BIGINT NOT NULL DEFAULT 1,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE UNIQUE INDEX schedules_name ON schedules (owner, name) WHERE name IS NOT NULL;
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused AND next_fire_at IS NOT NULL;

CREATE TABLE schedule_fires (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schedule_id TEXT NOT NULL,
    slot        BIGINT NOT NULL,
    manual      BOOLEAN NOT NULL DEFAULT FALSE,
    outcome     TEXT NOT NULL,
    run_id      TEXT,
    detail      TEXT,
    node        TEXT NOT NULL,
    fired_at    BIGINT NOT NULL
);
CREATE UNIQUE INDEX schedule_fires_slot ON schedule_fires (schedule_id, slot) WHERE NOT manual;
CREATE INDEX schedule_fires_by_schedule ON schedule_fires (schedule_id, seq);
CREATE INDEX schedule_fires_time ON schedule_fires (fired_at);
