//! The server's settings: one struct, every field documented. The CLI fills it from flags and
//! `AGENTRY_*` environment variables (`docs/configuration.md` lists both); everything else reads
//! it from here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A token bucket: `per_second` tokens refill per second, at most `burst` are held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    pub per_second: f64,
    pub burst: u32,
}

impl RateSpec {
    /// Parses `CLASS=RATE[:BURST]` (rate per second; burst defaults to the rate, at least 1).
    pub fn parse_rule(text: &str) -> Result<(String, RateSpec), String> {
        let (class, spec) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected CLASS=RATE[:BURST], e.g. invoke=50:100"))?;
        let (rate, burst) = match spec.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (spec, None),
        };
        let per_second: f64 = rate
            .parse()
            .ok()
            .filter(|r: &f64| r.is_finite() && *r > 0.0 && *r <= 1e9)
            .ok_or_else(|| format!("`{text}`: the rate must be a positive number per second"))?;
        let burst = match burst {
            Some(b) => b
                .parse::<u32>()
                .ok()
                .filter(|b| *b > 0)
                .ok_or_else(|| format!("`{text}`: the burst must be a positive integer"))?,
            None => per_second.ceil().max(1.0) as u32,
        };
        if !["invoke", "runs", "other"].contains(&class) {
            return Err(format!("`{text}`: the class is invoke, runs or other"));
        }
        Ok((class.to_string(), RateSpec { per_second, burst }))
    }
}

/// Settings of `agentry serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Address to bind. Default 127.0.0.1: serving beyond loopback is an explicit choice.
    pub host: IpAddr,
    /// Port to bind. `None`: RunAgent's policy, the first free port from 8450 up that no agent
    /// in RunAgent's database has recorded. `Some(0)`: any free port.
    pub port: Option<u16>,
    /// Where Agentry keeps its state (the worker shim, the run database, the node id).
    pub state_dir: PathBuf,
    /// Interpreter for every agent, overriding per-agent settings and discovery.
    pub python: Option<PathBuf>,
    /// Warm workers per agent (per-agent `agentry.workers` wins). Default: the number of cores.
    pub workers: usize,
    /// Async calls that may share one worker process.
    pub max_async_per_worker: usize,
    /// Sync calls to short entrypoints (averaging under 5 ms) that may queue on one busy
    /// worker, so that it answers them in batches. 1 turns pipelining off.
    pub pipeline_depth: usize,
    /// Default deadline of a call when neither the request nor the entrypoint sets one.
    pub default_timeout: Duration,
    /// Upper bound on any deadline a request or entrypoint asks for.
    pub max_timeout: Duration,
    /// How long in-flight calls may run after SIGINT/SIGTERM before workers are killed.
    pub shutdown_grace: Duration,
    /// Largest request body accepted (413 beyond it).
    pub max_body_bytes: usize,
    /// Largest frame on the worker protocol (a result or chunk bigger than this kills the call).
    pub max_frame_bytes: usize,
    /// Stream chunks a worker may produce ahead of a slow client (backpressure window).
    pub stream_window: u32,
    /// Address-space limit of each worker process, in MiB (`RLIMIT_AS`). `None`: no limit.
    pub worker_memory_mb: Option<u64>,
    /// How long a worker may take to import its agent and become ready.
    pub worker_start_timeout: Duration,
    /// How long a WebSocket client may take to send its start frame.
    pub ws_start_timeout: Duration,
    /// Keep RunAgent's database (discovery row, invocation history) up to date.
    pub runagent_db: bool,
    /// RunAgent's database file. Default `$RUNAGENT_CACHE_DIR/runagent_local.db`.
    pub runagent_db_path: Option<PathBuf>,
    /// Include Python tracebacks in native error responses (development only).
    pub expose_tracebacks: bool,
    /// The run database (SQLite). Default `<state_dir>/agentry.db`.
    pub runs_db_path: Option<PathBuf>,
    /// fsync every commit of the run database (`synchronous=FULL`): runs survive power loss.
    /// Off: they survive a crash of the server, not of the machine.
    pub runs_db_fsync: bool,
    /// How long a write to the run database waits for a lock held by another process before
    /// the request fails with 503.
    pub runs_db_busy_timeout: Duration,
    /// Largest run input (the `input` object's JSON) accepted, in bytes.
    pub max_run_input_bytes: usize,
    /// Runs executing at once on this node, all agents together.
    pub max_running_runs: usize,
    /// Runs of one agent leased at once on this node. Default: its workers × 16 × the pipeline
    /// depth (or × the async calls per worker, for agents with async entrypoints); those the
    /// workers cannot run yet wait in the pool in order, and their deadline starts when a
    /// worker takes them.
    pub max_running_runs_per_agent: Option<usize>,
    /// How long a claim holds a run without renewal; a node silent for longer loses its runs
    /// to the reaper. Leases are renewed every third of it.
    pub lease_ttl: Duration,
    /// Least time between two `run.heartbeat` events of one run.
    pub heartbeat_event_every: Duration,
    /// How long a running run may take to stop after a cancel before its worker is killed.
    pub cancel_grace: Duration,
    /// Finished runs (and their events and checkpoints) are deleted after this age.
    /// `None`: kept forever.
    pub run_retention: Option<Duration>,
    /// This node's name in leases. Default: a random id kept in the state directory.
    pub node_name: Option<String>,
    /// Require an API key even before the first key exists. Otherwise authentication turns on
    /// with the first key.
    pub auth_required: bool,
    /// Serve a non-loopback address while authentication is off.
    pub insecure_no_auth: bool,
    /// Rate limits per caller (API key, or client IP without authentication), per route class.
    pub caller_rate_limits: Vec<(String, RateSpec)>,
    /// Rate limits per agent, per route class.
    pub agent_rate_limits: Vec<(String, RateSpec)>,
    /// PostgreSQL URL through which nodes share their rate limits; `None`: each node on its
    /// own. Holds a password: never logged.
    pub rate_limit_postgres: Option<String>,
    /// How often a node exchanges its rate-limit use with the others.
    pub rate_limit_sync: Duration,
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also ends idle keep-alive connections).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); 431 beyond it.
    pub max_header_bytes: usize,
    /// Origins browsers may call from (CORS). Empty: CORS off (no cross-origin browser access);
    /// `*`: any origin.
    pub cors_origins: Vec<String>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: None,
            state_dir: PathBuf::from(".agentry"),
            python: None,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            max_async_per_worker: 64,
            pipeline_depth: 8,
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(30),
            max_body_bytes: 10 * 1024 * 1024,
            max_frame_bytes: 16 * 1024 * 1024,
            stream_window: 64,
            worker_memory_mb: None,
            worker_start_timeout: Duration::from_secs(60),
            ws_start_timeout: Duration::from_secs(60),
            runagent_db: true,
            runagent_db_path: None,
            expose_tracebacks: false,
            runs_db_path: None,
            runs_db_fsync: true,
            runs_db_busy_timeout: Duration::from_secs(5),
            max_run_input_bytes: 1024 * 1024,
            max_running_runs: 1024,
            max_running_runs_per_agent: None,
            lease_ttl: Duration::from_secs(30),
            heartbeat_event_every: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            run_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            node_name: None,
            auth_required: false,
            insecure_no_auth: false,
            caller_rate_limits: Vec::new(),
            agent_rate_limits: Vec::new(),
            rate_limit_postgres: None,
            rate_limit_sync: Duration::from_millis(100),
            cors_origins: Vec::new(),
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }
}

impl ServeSettings {
    /// The deadline of one call: the request's, else the entrypoint's, else the default,
    /// never more than the maximum. Non-positive or non-finite requests are ignored.
    pub fn call_timeout(&self, requested_s: Option<f64>, entrypoint_s: Option<f64>) -> Duration {
        let pick = requested_s
            .filter(|s| s.is_finite() && *s > 0.0)
            .or(entrypoint_s)
            .map(|s| Duration::try_from_secs_f64(s).unwrap_or(self.max_timeout))
            .unwrap_or(self.default_timeout);
        pick.min(self.max_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_timeout_precedence_and_cap() {
        let s = ServeSettings::default();
        assert_eq!(s.call_timeout(None, None), Duration::from_secs(300));
        assert_eq!(s.call_timeout(None, Some(2.0)), Duration::from_secs(2));
        assert_eq!(s.call_timeout(Some(5.0), Some(2.0)), Duration::from_secs(5));
        assert_eq!(s.call_timeout(Some(1e9), None), Duration::from_secs(3600));
        assert_eq!(s.call_timeout(Some(-1.0), None), Duration::from_secs(300));
        assert_eq!(
            s.call_timeout(Some(f64::NAN), Some(7.0)),
            Duration::from_secs(7)
        );
    }
}
