//! `agentry`: serve RunAgent-style agent folders as a fast, safe service, and talk to a server.
//!
//! Data goes to stdout (pipeable); diagnostics go to stderr.

mod client;
mod init;
mod keys;
mod runs;
mod serve;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

// Every request allocates a few small buffers; mimalloc makes those markedly cheaper than glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentry",
    version,
    about = "A self-hostable runtime for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one or more agent folders over REST, WebSocket and SSE.
    Serve(ServeArgs),
    /// Check agent folders (config, interpreter, imports, signatures) without serving.
    Validate(ValidateArgs),
    /// Call an entrypoint on a running server and print the result (or chunks as they arrive).
    Run(client::RunArgs),
    /// Durable runs on a running server: create, get, list, wait, cancel, events.
    Runs(runs::RunsArgs),
    /// API keys, offline in the state directory: create, list, revoke.
    Keys(keys::KeysArgs),
    /// Create a working example agent folder (offline).
    Init {
        /// The folder to create.
        path: PathBuf,
    },
}

/// Options shared by `serve` and `validate`.
#[derive(Args, Clone)]
struct AgentArgs {
    /// Agent folders (each with a runagent.config.json/.yaml/.yml).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Python interpreter for every agent (else: the agent's `agentry.python`, its `.venv`,
    /// `VIRTUAL_ENV`, `python3` on PATH).
    #[arg(long, env = "AGENTRY_PYTHON")]
    python: Option<PathBuf>,
    /// Where Agentry keeps its state.
    #[arg(long, env = "AGENTRY_STATE_DIR", default_value = ".agentry")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    agents: AgentArgs,
    /// Address to bind. Anything but loopback needs --insecure-no-auth until API keys exist.
    #[arg(long, env = "AGENTRY_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind; 0 picks a free one. Default: RunAgent's policy (8450 upward).
    #[arg(long, env = "AGENTRY_PORT")]
    port: Option<u16>,
    /// Warm workers per agent. Default: the number of cores.
    #[arg(long, env = "AGENTRY_WORKERS")]
    workers: Option<usize>,
    /// Async calls that may share one worker.
    #[arg(long, env = "AGENTRY_MAX_ASYNC_PER_WORKER", default_value_t = 64)]
    max_async_per_worker: usize,
    /// Short sync calls that may queue on one busy worker (1 turns pipelining off).
    #[arg(long, env = "AGENTRY_PIPELINE_DEPTH", default_value_t = 8)]
    pipeline_depth: usize,
    /// Threads serving HTTP. Default: half the cores (at least one); the rest run Python.
    #[arg(long, env = "AGENTRY_IO_THREADS")]
    io_threads: Option<usize>,
    /// Default call deadline in seconds.
    #[arg(long, env = "AGENTRY_TIMEOUT_S", default_value_t = 300.0)]
    timeout_s: f64,
    /// Largest deadline a request or entrypoint may ask for, in seconds.
    #[arg(long, env = "AGENTRY_MAX_TIMEOUT_S", default_value_t = 3600.0)]
    max_timeout_s: f64,
    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "AGENTRY_SHUTDOWN_GRACE_S", default_value_t = 30.0)]
    shutdown_grace_s: f64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "AGENTRY_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest worker protocol frame (one result or chunk) in bytes.
    #[arg(long, env = "AGENTRY_MAX_FRAME_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_frame_bytes: usize,
    /// Address-space limit per worker process, in MiB.
    #[arg(long, env = "AGENTRY_WORKER_MEMORY_MB")]
    worker_memory_mb: Option<u64>,
    /// Do not read or write RunAgent's database (no discovery row, no invocation history).
    #[arg(long, env = "AGENTRY_NO_RUNAGENT_DB")]
    no_runagent_db: bool,
    /// RunAgent's database file (default: $RUNAGENT_CACHE_DIR/runagent_local.db).
    #[arg(long, env = "AGENTRY_RUNAGENT_DB")]
    runagent_db: Option<PathBuf>,
    /// Include Python tracebacks in native API errors (development only).
    #[arg(long, env = "AGENTRY_EXPOSE_TRACEBACKS")]
    expose_tracebacks: bool,
    /// Serve a non-loopback address while authentication is off (no API key exists).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Rate limit per caller (API key, or client IP without authentication):
    /// CLASS=RATE[:BURST], CLASS one of invoke, runs, other; repeatable. E.g. invoke=50:100.
    #[arg(long = "rate-limit", env = "AGENTRY_RATE_LIMIT", value_delimiter = ',')]
    rate_limits: Vec<String>,
    /// Rate limit per agent: CLASS=RATE[:BURST]; repeatable.
    #[arg(
        long = "agent-rate-limit",
        env = "AGENTRY_AGENT_RATE_LIMIT",
        value_delimiter = ','
    )]
    agent_rate_limits: Vec<String>,
    /// Share the rate limits with the other nodes through this PostgreSQL database
    /// (`postgres://user:password@host/db`; `?sslmode=require` for TLS). Never logged.
    #[arg(long, env = "AGENTRY_RATE_LIMIT_POSTGRES", hide_env_values = true)]
    rate_limit_postgres: Option<String>,
    /// How often a node exchanges its rate-limit use with the others, in milliseconds.
    #[arg(long, env = "AGENTRY_RATE_LIMIT_SYNC_MS", default_value_t = 100)]
    rate_limit_sync_ms: u64,
    /// Connections open at once; further ones wait in the kernel's backlog.
    #[arg(long, env = "AGENTRY_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (also closes idle keep-alive connections).
    #[arg(long, env = "AGENTRY_HEADER_READ_TIMEOUT_S", default_value_t = 30.0)]
    header_read_timeout_s: f64,
    /// Largest request head (request line and headers) in bytes; 431 beyond it.
    #[arg(long, env = "AGENTRY_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Allow browsers on this origin to call the API (CORS); repeatable; `*` for any. Off by default.
    #[arg(
        long = "cors-origin",
        env = "AGENTRY_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// `auto`: API keys are required once one exists; `required`: always (even before the first).
    #[arg(long, env = "AGENTRY_AUTH", value_enum, default_value_t = AuthMode::Auto)]
    auth: AuthMode,
    /// The run database file. Default: <state-dir>/agentry.db.
    #[arg(long, env = "AGENTRY_RUNS_DB")]
    runs_db: Option<PathBuf>,
    /// Commit runs without fsync: they survive a crash of the server, not a power loss.
    #[arg(long, env = "AGENTRY_RUNS_DB_NO_FSYNC")]
    runs_db_no_fsync: bool,
    /// Seconds a run-database write waits for another process's lock before answering 503.
    #[arg(long, env = "AGENTRY_RUNS_DB_BUSY_TIMEOUT_S", default_value_t = 5.0)]
    runs_db_busy_timeout_s: f64,
    /// Largest run input in bytes (413 beyond).
    #[arg(long, env = "AGENTRY_MAX_RUN_INPUT_BYTES", default_value_t = 1024 * 1024)]
    max_run_input_bytes: usize,
    /// Runs executing at once on this node.
    #[arg(long, env = "AGENTRY_MAX_RUNNING_RUNS", default_value_t = 1024)]
    max_running_runs: usize,
    /// Runs of one agent leased at once (default: workers x 16 x pipeline depth, or x async
    /// calls per worker for async agents); the rest wait queued.
    #[arg(long, env = "AGENTRY_MAX_RUNNING_RUNS_PER_AGENT")]
    max_running_runs_per_agent: Option<usize>,
    /// Seconds a run's lease lasts without renewal (renewed every third of it).
    #[arg(long, env = "AGENTRY_LEASE_TTL_S", default_value_t = 30.0)]
    lease_ttl_s: f64,
    /// Least seconds between two run.heartbeat events of one run.
    #[arg(long, env = "AGENTRY_HEARTBEAT_EVENT_S", default_value_t = 30.0)]
    heartbeat_event_s: f64,
    /// Seconds a cancelled running run gets to stop before its worker is killed.
    #[arg(long, env = "AGENTRY_CANCEL_GRACE_S", default_value_t = 5.0)]
    cancel_grace_s: f64,
    /// Hours finished runs are kept (0: forever).
    #[arg(long, env = "AGENTRY_RUN_RETENTION_H", default_value_t = 168.0)]
    run_retention_h: f64,
    /// This node's name in run leases (default: a random id kept in the state directory).
    #[arg(long, env = "AGENTRY_NODE_NAME")]
    node_name: Option<String>,
}

/// When API keys are required.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    Auto,
    Required,
}

#[derive(Args)]
struct ValidateArgs {
    #[command(flatten)]
    agents: AgentArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AGENTRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server's own work per request is small next to the Python workers'; on a small
    // machine, fewer I/O threads leave the cores to the workers and avoid cross-thread wakeups.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let io_threads = match &cli.command {
        Command::Serve(args) => args.io_threads.unwrap_or((cores / 2).max(1)).max(1),
        _ => 2,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                init_tracing();
                serve::serve(args).await
            }
            Command::Validate(args) => serve::validate(args).await,
            Command::Run(args) => client::run(args).await,
            Command::Runs(args) => runs::runs(args).await,
            Command::Keys(args) => keys::keys(args).await,
            Command::Init { path } => init::init(&path),
        }
    });
    // Workers and pending writes are finished by now; don't wait for idle blocking threads.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
