-- RunAgent 0.1.49's local database ($RUNAGENT_CACHE_DIR/runagent_local.db), as SQLAlchemy's
-- create_all makes it (runagent/sdk/db.py). RunAgent's SDKs find a server through `agents`.
CREATE TABLE IF NOT EXISTS agents (
	agent_id VARCHAR NOT NULL,
	agent_path VARCHAR NOT NULL,
	host VARCHAR NOT NULL,
	port INTEGER NOT NULL,
	framework VARCHAR,
	status VARCHAR,
	remote_status VARCHAR,
	is_local BOOLEAN,
	fingerprint VARCHAR,
	deployed_at DATETIME,
	last_run DATETIME,
	run_count INTEGER,
	success_count INTEGER,
	error_count INTEGER,
	created_at DATETIME,
	updated_at DATETIME,
	agent_name VARCHAR,
	description TEXT,
	template VARCHAR,
	version VARCHAR,
	initialized_at DATETIME,
	config_fingerprint VARCHAR,
	project_id VARCHAR,
	PRIMARY KEY (agent_id)
);
CREATE INDEX IF NOT EXISTS idx_agents_status ON agents (status);
CREATE TABLE IF NOT EXISTS user_metadata (
	"key" VARCHAR NOT NULL,
	value TEXT NOT NULL,
	created_at DATETIME,
	updated_at DATETIME,
	PRIMARY KEY ("key")
);
CREATE INDEX IF NOT EXISTS idx_user_metadata_key ON user_metadata ("key");
CREATE TABLE IF NOT EXISTS agent_runs (
	id INTEGER NOT NULL,
	agent_id VARCHAR NOT NULL,
	input_data TEXT NOT NULL,
	output_data TEXT,
	success BOOLEAN NOT NULL,
	error_message TEXT,
	execution_time FLOAT,
	started_at DATETIME,
	completed_at DATETIME,
	PRIMARY KEY (id),
	FOREIGN KEY(agent_id) REFERENCES agents (agent_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_agent_runs_started_at ON agent_runs (started_at);
CREATE INDEX IF NOT EXISTS idx_agent_runs_agent_id ON agent_runs (agent_id);
CREATE TABLE IF NOT EXISTS agent_invocations (
	invocation_id VARCHAR NOT NULL,
	agent_id VARCHAR NOT NULL,
	input_data TEXT NOT NULL,
	output_data TEXT,
	error_detail TEXT,
	request_timestamp DATETIME NOT NULL,
	response_timestamp DATETIME,
	execution_time_ms FLOAT,
	status VARCHAR NOT NULL,
	entrypoint_tag VARCHAR,
	sdk_type VARCHAR,
	client_info TEXT,
	PRIMARY KEY (invocation_id),
	FOREIGN KEY(agent_id) REFERENCES agents (agent_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_invocations_agent_status ON agent_invocations (agent_id, status);
CREATE INDEX IF NOT EXISTS idx_invocations_request_timestamp ON agent_invocations (request_timestamp);
CREATE INDEX IF NOT EXISTS idx_invocations_status ON agent_invocations (status);
CREATE INDEX IF NOT EXISTS idx_invocations_agent_id ON agent_invocations (agent_id);
CREATE TABLE IF NOT EXISTS agent_logs (
	id INTEGER NOT NULL,
	agent_id VARCHAR NOT NULL,
	log_level VARCHAR NOT NULL,
	message TEXT NOT NULL,
	created_at DATETIME,
	execution_id VARCHAR,
	PRIMARY KEY (id),
	FOREIGN KEY(agent_id) REFERENCES agents (agent_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_agent_logs_agent_id ON agent_logs (agent_id);
CREATE INDEX IF NOT EXISTS idx_agent_logs_created_at ON agent_logs (created_at);
CREATE INDEX IF NOT EXISTS idx_agent_logs_level ON agent_logs (log_level);
