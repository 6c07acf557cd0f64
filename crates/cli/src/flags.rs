//! The flags of `agentry serve` (also taken by `validate` and `config`). Each names one setting
//! of `agentry_core::Config` (its key is in `agentry_core::settings::FIELDS`, with its meaning
//! and its environment variable); none has a default here: a flag left out leaves the setting
//! to `agentry.toml`, the environment, or the default written in `Config`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};

/// When API keys are required.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    Auto,
    Required,
}

/// Every serve setting that has a flag. Help texts are short; `docs/configuration.md` says
/// more, with each default.
#[derive(Args, Clone, Default)]
pub struct ServeFlags {
    /// Agent folders (each with a runagent.config.json/.yaml/.yml).
    pub paths: Vec<PathBuf>,
    /// The configuration file (default: ./agentry.toml when present).
    #[arg(long, env = "AGENTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where Agentry keeps its state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// This node's name in run leases (default: a random id kept in the state directory).
    #[arg(long)]
    node_name: Option<String>,
    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM.
    #[arg(long)]
    shutdown_grace_s: Option<f64>,
    /// Address to bind. Anything but loopback needs --insecure-no-auth until API keys exist.
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port to bind; 0 picks a free one. Default: RunAgent's policy (8450 upward).
    #[arg(long)]
    port: Option<u16>,
    /// Threads serving HTTP. Default: half the cores (at least one); the rest run Python.
    #[arg(long)]
    io_threads: Option<usize>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Connections open at once; further ones wait in the kernel's backlog.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (also closes idle keep-alive connections).
    #[arg(long)]
    header_read_timeout_s: Option<f64>,
    /// Largest request head (request line and headers) in bytes; 431 beyond it.
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// Allow browsers on this origin to call the API (CORS); repeatable; `*` for any.
    #[arg(long = "cors-origin", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Warm workers per agent. Default: the number of cores.
    #[arg(long)]
    workers: Option<usize>,
    /// Python interpreter for every agent (else: the agent's own setting, its `.venv`,
    /// `VIRTUAL_ENV`, `python3` on PATH).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Async calls that may share one worker.
    #[arg(long)]
    max_async_per_worker: Option<usize>,
    /// Short sync calls that may queue on one busy worker (1 turns pipelining off).
    #[arg(long)]
    pipeline_depth: Option<usize>,
    /// Default call deadline in seconds.
    #[arg(long)]
    timeout_s: Option<f64>,
    /// Largest deadline a request or entrypoint may ask for, in seconds.
    #[arg(long)]
    max_timeout_s: Option<f64>,
    /// Largest worker protocol frame (one result or chunk) in bytes.
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// Address-space limit per worker process, in MiB.
    #[arg(long)]
    worker_memory_mb: Option<u64>,
    /// Largest run input in bytes (413 beyond).
    #[arg(long)]
    max_run_input_bytes: Option<usize>,
    /// Runs executing at once on this node.
    #[arg(long)]
    max_running_runs: Option<usize>,
    /// Runs of one agent leased at once; the rest wait queued.
    #[arg(long)]
    max_running_runs_per_agent: Option<usize>,
    /// Runs leased at once by all the nodes on the shared database together.
    #[arg(long)]
    cluster_max_running_runs: Option<usize>,
    /// Runs of one agent leased at once by all the nodes on the shared database together.
    #[arg(long)]
    cluster_max_running_runs_per_agent: Option<usize>,
    /// Seconds a run's lease lasts without renewal (renewed every third of it).
    #[arg(long)]
    lease_ttl_s: Option<f64>,
    /// Least seconds between two run.heartbeat events of one run.
    #[arg(long)]
    heartbeat_event_s: Option<f64>,
    /// Seconds a cancelled running run gets to stop before its worker is killed.
    #[arg(long)]
    cancel_grace_s: Option<f64>,
    /// Hours finished runs are kept (0: forever).
    #[arg(long)]
    run_retention_h: Option<f64>,
    /// Most events one attempt of a run may write (then it fails with payload_too_large).
    #[arg(long)]
    max_events_per_attempt: Option<u64>,
    /// Most bytes of event data one attempt may write.
    #[arg(long)]
    max_event_bytes_per_attempt: Option<u64>,
    /// The IANA time zone of schedules that name none (default UTC).
    #[arg(long)]
    default_timezone: Option<String>,
    /// Seconds after which a schedule's slot not yet fired is missed (its `missed` policy
    /// decides).
    #[arg(long)]
    schedule_missed_after_s: Option<f64>,
    /// Seconds between looks for schedules made or changed elsewhere.
    #[arg(long)]
    schedule_poll_s: Option<f64>,
    /// Never fire schedules on this node (the schedules API still works).
    #[arg(long)]
    no_schedules: bool,
    /// A file holding the secret callbacks are signed with (AGENTRY_CALLBACK_SECRET gives it
    /// directly).
    #[arg(long)]
    callback_secret_file: Option<PathBuf>,
    /// Attempts to deliver a run's callback before it is marked failed.
    #[arg(long)]
    callback_max_attempts: Option<u32>,
    /// One callback attempt's deadline, in seconds.
    #[arg(long)]
    callback_timeout_s: Option<f64>,
    /// Seconds to wait after a failed callback attempt (doubled after each, with jitter).
    #[arg(long)]
    callback_retry_base_s: Option<f64>,
    /// The longest wait between two callback attempts, in seconds.
    #[arg(long)]
    callback_retry_max_s: Option<f64>,
    /// Deliver callbacks to loopback, private and link-local addresses too.
    #[arg(long)]
    allow_private_callbacks: bool,
    /// Milliseconds between looks for callbacks due.
    #[arg(long)]
    callback_poll_ms: Option<u64>,
    /// The longest chain of runs started by event triggers.
    #[arg(long)]
    trigger_max_depth: Option<u32>,
    /// Milliseconds between reads of the event log for triggers.
    #[arg(long)]
    trigger_poll_ms: Option<u64>,
    /// A PEM file of root certificates trusted for outbound https:// calls, besides the
    /// system's.
    #[arg(long)]
    outbound_ca_file: Option<PathBuf>,
    /// The run database file. Default: <state-dir>/agentry.db.
    #[arg(long)]
    runs_db: Option<PathBuf>,
    /// Keep runs and API keys in PostgreSQL (`postgres://user:password@host/db`), shared by
    /// every node started with the same URL. Never logged.
    #[arg(long)]
    database: Option<String>,
    /// The PostgreSQL schema for Agentry's tables (default: the URL's).
    #[arg(long)]
    database_schema: Option<String>,
    /// PostgreSQL connections this node keeps at most.
    #[arg(long)]
    database_max_connections: Option<u32>,
    /// PostgreSQL batches of each kind sent at once (group commit).
    #[arg(long)]
    database_batches_in_flight: Option<u32>,
    /// Commit runs without fsync: they survive a crash of the server, not a power loss.
    #[arg(long)]
    runs_db_no_fsync: bool,
    /// Seconds a run-database write waits for another process's lock before answering 503.
    #[arg(long)]
    runs_db_busy_timeout_s: Option<f64>,
    /// Do not read or write RunAgent's database (no discovery row, no invocation history).
    #[arg(long)]
    no_runagent_db: bool,
    /// RunAgent's database file (default: $RUNAGENT_CACHE_DIR/runagent_local.db).
    #[arg(long)]
    runagent_db: Option<PathBuf>,
    /// Most rows of RunAgent's invocation history kept (0: no bound).
    #[arg(long)]
    runagent_history_max_rows: Option<u64>,
    /// Seconds an invocation stays in RunAgent's history (0: no bound).
    #[arg(long)]
    runagent_history_max_age_s: Option<f64>,
    /// `auto`: API keys are required once one exists; `required`: always (even before the first).
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
    /// Serve a non-loopback address while authentication is off (no API key exists).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Include Python tracebacks in native API errors (development only).
    #[arg(long)]
    expose_tracebacks: bool,
    /// Rate limit per caller (API key, or client IP without authentication):
    /// CLASS=RATE[:BURST], CLASS one of invoke, runs, other; repeatable. E.g. invoke=50:100.
    #[arg(long = "rate-limit", value_delimiter = ',')]
    rate_limits: Vec<String>,
    /// Rate limit per agent: CLASS=RATE[:BURST]; repeatable.
    #[arg(long = "agent-rate-limit", value_delimiter = ',')]
    agent_rate_limits: Vec<String>,
    /// Share the rate limits with the other nodes through this PostgreSQL database
    /// (`postgres://user:password@host/db`). Never logged.
    #[arg(long)]
    rate_limit_postgres: Option<String>,
    /// How often a node exchanges its rate-limit use with the others, in milliseconds.
    #[arg(long)]
    rate_limit_sync_ms: Option<u64>,
}

fn put<T: serde::Serialize>(
    out: &mut Vec<(&'static str, Value)>,
    key: &'static str,
    v: &Option<T>,
) {
    if let Some(v) = v {
        out.push((key, json!(v)));
    }
}

impl ServeFlags {
    /// The settings these flags give, by dotted key (only those given).
    pub fn settings(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if !self.paths.is_empty() {
            out.push(("agent_dirs", json!(self.paths)));
        }
        put(&mut out, "state_dir", &self.state_dir);
        put(&mut out, "node_name", &self.node_name);
        put(&mut out, "shutdown_grace_s", &self.shutdown_grace_s);
        put(&mut out, "http.host", &self.host);
        put(&mut out, "http.port", &self.port);
        put(&mut out, "http.io_threads", &self.io_threads);
        put(&mut out, "http.max_body_bytes", &self.max_body_bytes);
        put(&mut out, "http.max_connections", &self.max_connections);
        put(
            &mut out,
            "http.header_read_timeout_s",
            &self.header_read_timeout_s,
        );
        put(&mut out, "http.max_header_bytes", &self.max_header_bytes);
        if !self.cors_origins.is_empty() {
            out.push(("http.cors_origins", json!(self.cors_origins)));
        }
        put(&mut out, "workers.count", &self.workers);
        put(&mut out, "workers.python", &self.python);
        put(
            &mut out,
            "workers.max_async_per_worker",
            &self.max_async_per_worker,
        );
        put(&mut out, "workers.pipeline_depth", &self.pipeline_depth);
        put(&mut out, "workers.timeout_s", &self.timeout_s);
        put(&mut out, "workers.max_timeout_s", &self.max_timeout_s);
        put(&mut out, "workers.max_frame_bytes", &self.max_frame_bytes);
        put(&mut out, "workers.memory_mb", &self.worker_memory_mb);
        put(&mut out, "runs.max_input_bytes", &self.max_run_input_bytes);
        put(&mut out, "runs.max_running", &self.max_running_runs);
        put(
            &mut out,
            "runs.max_running_per_agent",
            &self.max_running_runs_per_agent,
        );
        put(
            &mut out,
            "runs.cluster_max_running",
            &self.cluster_max_running_runs,
        );
        put(
            &mut out,
            "runs.cluster_max_running_per_agent",
            &self.cluster_max_running_runs_per_agent,
        );
        put(&mut out, "runs.lease_ttl_s", &self.lease_ttl_s);
        put(&mut out, "runs.heartbeat_event_s", &self.heartbeat_event_s);
        put(&mut out, "runs.cancel_grace_s", &self.cancel_grace_s);
        put(&mut out, "runs.retention_h", &self.run_retention_h);
        put(
            &mut out,
            "runs.max_events_per_attempt",
            &self.max_events_per_attempt,
        );
        put(
            &mut out,
            "runs.max_event_bytes_per_attempt",
            &self.max_event_bytes_per_attempt,
        );
        put(
            &mut out,
            "schedules.default_timezone",
            &self.default_timezone,
        );
        put(
            &mut out,
            "schedules.missed_after_s",
            &self.schedule_missed_after_s,
        );
        put(&mut out, "schedules.poll_s", &self.schedule_poll_s);
        if self.no_schedules {
            out.push(("schedules.enabled", json!(false)));
        }
        put(
            &mut out,
            "callbacks.secret_file",
            &self.callback_secret_file,
        );
        put(
            &mut out,
            "callbacks.max_attempts",
            &self.callback_max_attempts,
        );
        put(&mut out, "callbacks.timeout_s", &self.callback_timeout_s);
        put(
            &mut out,
            "callbacks.retry_base_s",
            &self.callback_retry_base_s,
        );
        put(
            &mut out,
            "callbacks.retry_max_s",
            &self.callback_retry_max_s,
        );
        if self.allow_private_callbacks {
            out.push(("callbacks.allow_private", json!(true)));
        }
        put(&mut out, "callbacks.poll_ms", &self.callback_poll_ms);
        put(&mut out, "triggers.max_depth", &self.trigger_max_depth);
        put(&mut out, "triggers.poll_ms", &self.trigger_poll_ms);
        put(&mut out, "outbound.ca_file", &self.outbound_ca_file);
        put(&mut out, "store.path", &self.runs_db);
        put(&mut out, "store.database_url", &self.database);
        put(&mut out, "store.database_schema", &self.database_schema);
        put(
            &mut out,
            "store.database_max_connections",
            &self.database_max_connections,
        );
        put(
            &mut out,
            "store.database_batches_in_flight",
            &self.database_batches_in_flight,
        );
        if self.runs_db_no_fsync {
            out.push(("store.fsync", json!(false)));
        }
        put(
            &mut out,
            "store.busy_timeout_s",
            &self.runs_db_busy_timeout_s,
        );
        if self.no_runagent_db {
            out.push(("store.runagent_db", json!(false)));
        }
        put(&mut out, "store.runagent_db_path", &self.runagent_db);
        put(
            &mut out,
            "store.runagent_history_max_rows",
            &self.runagent_history_max_rows,
        );
        put(
            &mut out,
            "store.runagent_history_max_age_s",
            &self.runagent_history_max_age_s,
        );
        if let Some(mode) = self.auth {
            let text = match mode {
                AuthMode::Auto => "auto",
                AuthMode::Required => "required",
            };
            out.push(("gateway.auth", json!(text)));
        }
        if self.insecure_no_auth {
            out.push(("gateway.insecure_no_auth", json!(true)));
        }
        if self.expose_tracebacks {
            out.push(("gateway.expose_tracebacks", json!(true)));
        }
        if !self.rate_limits.is_empty() {
            out.push(("gateway.rate_limits", json!(self.rate_limits)));
        }
        if !self.agent_rate_limits.is_empty() {
            out.push(("gateway.agent_rate_limits", json!(self.agent_rate_limits)));
        }
        put(
            &mut out,
            "gateway.rate_limit_postgres",
            &self.rate_limit_postgres,
        );
        put(
            &mut out,
            "gateway.rate_limit_sync_ms",
            &self.rate_limit_sync_ms,
        );
        out
    }

    /// The configuration from every layer, these flags on top.
    pub fn load(&self) -> anyhow::Result<agentry_server::config::Loaded> {
        agentry_server::config::load(agentry_server::config::Sources::from_process(
            self.config.clone(),
            self.settings(),
        ))
    }
}

/// Where the shared PostgreSQL database is, for the commands that work on it offline
/// (`agentry keys`, `agentry migrate`).
#[derive(clap::Args)]
pub struct DatabaseFlags {
    /// The PostgreSQL database the nodes share (`postgres://…`), instead of the SQLite file.
    #[arg(long, global = true)]
    database: Option<String>,
    /// The PostgreSQL schema of Agentry's tables (default: the URL's).
    #[arg(long, global = true)]
    database_schema: Option<String>,
}

impl DatabaseFlags {
    /// The settings these flags set, as configuration-layer entries.
    pub fn settings(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        put(&mut out, "store.database_url", &self.database);
        put(&mut out, "store.database_schema", &self.database_schema);
        out
    }
}
