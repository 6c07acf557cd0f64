-- The cluster's nodes, as each reports itself every heartbeat (GET /v1/nodes), and the
-- rate-limit buckets the nodes share (GCRA: one row per bucket, its theoretical arrival time),
-- so that shared limits need no second database. Times are Unix milliseconds, the database's
-- clock.

CREATE TABLE agentry_nodes (
    name       TEXT    PRIMARY KEY,
    owner      TEXT    NOT NULL,     -- name/incarnation: the lease owner of its runs
    role       TEXT    NOT NULL,     -- serve | worker
    version    TEXT    NOT NULL,
    agents     TEXT[]  NOT NULL,
    capacity   BIGINT  NOT NULL,
    running    BIGINT  NOT NULL,
    started_at BIGINT  NOT NULL,
    last_seen  BIGINT  NOT NULL,
    stopped_at BIGINT
);

CREATE TABLE IF NOT EXISTS agentry_rate_buckets (
    bucket TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS agentry_rate_buckets_tat ON agentry_rate_buckets (tat_us);
