-- RunAgent's invocation history (its `agent_invocations`: the same columns), kept here when the
-- nodes share this database, so that every node lists every node's calls. Times are kept as
-- RunAgent writes them (`YYYY-MM-DD HH:MM:SS.ffffff`, UTC): text of one width, which sorts.
-- RunAgent's `agents` rows (discovery) stay in each node's own RunAgent database.
CREATE TABLE agent_invocations (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY, -- insertion order, for the row bound
    invocation_id      TEXT PRIMARY KEY,
    agent_id           TEXT NOT NULL,
    input_data         TEXT NOT NULL,
    output_data        TEXT,
    error_detail       TEXT,
    request_timestamp  TEXT NOT NULL,
    response_timestamp TEXT,
    execution_time_ms  DOUBLE PRECISION,
    status             TEXT NOT NULL,
    entrypoint_tag     TEXT,
    sdk_type           TEXT,
    client_info        TEXT
);
CREATE INDEX agent_invocations_agent ON agent_invocations (agent_id, request_timestamp);
CREATE INDEX agent_invocations_time ON agent_invocations (request_timestamp);
CREATE INDEX agent_invocations_seq ON agent_invocations (seq);
