-- Shared rate-limit buckets (GCRA): one row per bucket, its theoretical arrival time.
CREATE TABLE IF NOT EXISTS agentry_rate_buckets (
    bucket TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
)
;
CREATE INDEX IF NOT EXISTS agentry_rate_buckets_tat ON agentry_rate_buckets (tat_us)
