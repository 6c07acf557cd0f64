-- API keys: only the SHA-256 of a key is stored. Times are Unix milliseconds.
CREATE TABLE api_keys (
    id           TEXT   PRIMARY KEY,  -- ak_<id>, the public part of the key
    name         TEXT,
    hash         TEXT   NOT NULL,     -- hex SHA-256 of the whole key
    scopes       TEXT   NOT NULL,     -- JSON array of scope names
    agents       TEXT,                -- JSON array of agent ids or names; NULL: all agents
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
