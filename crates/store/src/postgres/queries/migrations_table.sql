-- Which migrations this database has, by number; `agentry migrate --status` lists them.
CREATE TABLE IF NOT EXISTS agentry_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at BIGINT  NOT NULL
)
