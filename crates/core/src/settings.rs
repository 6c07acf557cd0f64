//! The server's configuration: one struct in sections, each with one `Default` (every default is
//! written there and nowhere else), one `validate()`, and its derived values as methods.
//!
//! `agentry-server` fills it in layers: these defaults, then `agentry.toml`, then `AGENTRY_*`
//! environment variables, then command-line flags. [`FIELDS`] names every setting once, with
//! its flag, its environment variable and what it means; `docs/configuration.md` is generated
//! from it (a test keeps the two equal), and another test checks that it lists exactly the
//! fields of [`Config`]. No I/O here.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
        if !["invoke", "runs", "hooks", "other"].contains(&class) {
            return Err(format!(
                "`{text}`: the class is invoke, runs, hooks or other"
            ));
        }
        Ok((class.to_string(), RateSpec { per_second, burst }))
    }
}

/// Why a configuration cannot be used: the setting (dotted key) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// A positive, finite number of seconds as a duration.
fn positive_secs(key: &str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| bad(key, "must be a positive number of seconds"))
}

/// Seconds that are checked by `validate`; out-of-range values read as the fallback.
fn secs_or(value: f64, fallback: Duration) -> Duration {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .unwrap_or(fallback)
}

/// Everything `agentry serve` needs. `agentry config show` prints it with each value's source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The agent folders to serve.
    pub agent_dirs: Vec<PathBuf>,
    /// Where Agentry keeps its state.
    pub state_dir: PathBuf,
    /// This node's name in run leases.
    pub node_name: Option<String>,
    /// Seconds in-flight calls and runs get after SIGINT/SIGTERM.
    pub shutdown_grace_s: f64,
    pub http: HttpConfig,
    pub workers: WorkersConfig,
    pub runs: RunsConfig,
    pub store: StoreConfig,
    pub gateway: GatewayConfig,
    pub schedules: SchedulesConfig,
    pub callbacks: CallbacksConfig,
    pub triggers: TriggersConfig,
    pub outbound: OutboundConfig,
    /// Per-agent settings, by agent name (or id).
    pub agents: BTreeMap<String, AgentSettings>,
    /// The settings given by a flag or an environment variable (filled by the loader): these
    /// win over per-agent settings, which win over the rest.
    #[serde(skip)]
    pub command_line_keys: std::collections::BTreeSet<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            agent_dirs: Vec::new(),
            state_dir: PathBuf::from(".agentry"),
            node_name: None,
            shutdown_grace_s: 30.0,
            http: HttpConfig::default(),
            workers: WorkersConfig::default(),
            runs: RunsConfig::default(),
            store: StoreConfig::default(),
            gateway: GatewayConfig::default(),
            schedules: SchedulesConfig::default(),
            callbacks: CallbacksConfig::default(),
            triggers: TriggersConfig::default(),
            outbound: OutboundConfig::default(),
            agents: BTreeMap::new(),
            command_line_keys: Default::default(),
        }
    }
}

impl Config {
    /// Checks every section; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(bad("state_dir", "must not be empty"));
        }
        if !(self.shutdown_grace_s.is_finite() && self.shutdown_grace_s >= 0.0) {
            return Err(bad("shutdown_grace_s", "must be a number of seconds >= 0"));
        }
        if let Some(name) = &self.node_name
            && name.trim().is_empty()
        {
            return Err(bad("node_name", "must not be empty"));
        }
        self.http.validate()?;
        self.workers.validate()?;
        self.runs.validate()?;
        if self.runs.max_running == 0 && self.store.database_url.is_none() {
            // With the embedded store no other node can reach the queue: runs would wait forever.
            return Err(bad(
                "runs.max_running",
                "0 (execute nothing here) needs a shared database (store.database_url) whose workers execute the runs",
            ));
        }
        if self.store.database_url.is_none() {
            // One node is the whole cluster there: its own caps say it.
            for (key, set) in [
                ("runs.cluster_max_running", self.runs.cluster_max_running),
                (
                    "runs.cluster_max_running_per_agent",
                    self.runs.cluster_max_running_per_agent,
                ),
            ] {
                if set.is_some() {
                    return Err(bad(
                        key,
                        "caps runs across the nodes of a shared database (store.database_url); on the embedded store use runs.max_running and runs.max_running_per_agent",
                    ));
                }
            }
        }
        self.store.validate()?;
        self.gateway.validate()?;
        self.schedules.validate()?;
        self.callbacks.validate()?;
        self.triggers.validate()?;
        self.timers()?;
        let mut hooks: BTreeMap<&str, String> = BTreeMap::new();
        for (name, agent) in &self.agents {
            agent.validate(&format!("agents.{name}"))?;
            for (tag, e) in &agent.entrypoints {
                let Some(hook) = &e.webhook else { continue };
                // A replay is refused while the first delivery's run is kept: it must be kept
                // at least as long as a signed timestamp stays fresh.
                if self.runs.retention_h > 0.0
                    && hook.tolerance_s as f64 > self.runs.retention_h * 3600.0
                {
                    return Err(bad(
                        &format!("agents.{name}.entrypoints.{tag}.webhook.tolerance_s"),
                        "must not exceed runs.retention_h (a replay is recognised while the first delivery's run is kept)",
                    ));
                }
                let at = format!("agents.{name}.entrypoints.{tag}.webhook.name");
                if let Some(first) = hooks.insert(&hook.name, at.clone()) {
                    return Err(bad(
                        &at,
                        format!("the hook `{}` is also declared at {first}", hook.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every timer declared, as the schedule it stands for (its agent as written under
    /// `agents`).
    pub fn timers(&self) -> Result<Vec<crate::schedules::ScheduleSpec>, ConfigError> {
        let mut out: Vec<crate::schedules::ScheduleSpec> = Vec::new();
        for (agent, a) in &self.agents {
            for (tag, e) in &a.entrypoints {
                for (i, timer) in e.timers.iter().enumerate() {
                    let at = format!("agents.{agent}.entrypoints.{tag}.timers[{i}]");
                    let mut doc = timer.clone();
                    for reserved in ["agent", "entrypoint"] {
                        if doc.contains_key(reserved) {
                            return Err(bad(
                                &format!("{at}.{reserved}"),
                                "is the agent and entrypoint the timer is declared under",
                            ));
                        }
                    }
                    doc.insert("agent".into(), agent.as_str().into());
                    doc.insert("entrypoint".into(), tag.as_str().into());
                    let spec: crate::schedules::ScheduleSpec =
                        serde_json::from_value(serde_json::Value::Object(doc))
                            .map_err(|e| bad(&at, format!("not a schedule: {e}")))?;
                    let Some(name) = spec.name.as_deref() else {
                        return Err(bad(&format!("{at}.name"), "a timer needs a name"));
                    };
                    // Declared again at every start, a timer must mean the same instant each time.
                    if spec.delay_s.is_some() || spec.at_text.is_some() {
                        return Err(bad(
                            &at,
                            "a timer's one-shot time is an RFC 3339 `at` (a delay or an English time would move at every start)",
                        ));
                    }
                    if let Some(when) = &spec.at
                        && chrono::DateTime::parse_from_rfc3339(when).is_err()
                    {
                        return Err(bad(
                            &format!("{at}.at"),
                            "must be an RFC 3339 time (a delay or an English time would move at every start)",
                        ));
                    }
                    if out.iter().any(|o| o.name.as_deref() == Some(name)) {
                        return Err(bad(
                            &format!("{at}.name"),
                            format!("another timer is named `{name}`"),
                        ));
                    }
                    out.push(spec);
                }
            }
        }
        Ok(out)
    }

    /// Every webhook declared: the agent's key under `agents`, the entrypoint's tag, and
    /// the hook's settings.
    /// The event triggers declared under the agents' entrypoints: (agent, tag, settings),
    /// `event` first, then each of `events`.
    pub fn event_triggers(
        &self,
    ) -> impl Iterator<Item = (&str, &str, &crate::triggers::EventTriggerSettings)> {
        self.agents.iter().flat_map(|(agent, a)| {
            a.entrypoints.iter().flat_map(move |(tag, e)| {
                e.event
                    .iter()
                    .chain(&e.events)
                    .map(move |t| (agent.as_str(), tag.as_str(), t))
            })
        })
    }

    pub fn webhooks(
        &self,
    ) -> impl Iterator<Item = (&str, &str, &crate::webhooks::WebhookSettings)> {
        self.agents.iter().flat_map(|(agent, a)| {
            a.entrypoints.iter().filter_map(move |(tag, e)| {
                e.webhook
                    .as_ref()
                    .map(|h| (agent.as_str(), tag.as_str(), h))
            })
        })
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::try_from_secs_f64(self.shutdown_grace_s).unwrap_or(Duration::ZERO)
    }

    /// The per-agent settings of the agent with this name or id, if any.
    pub fn agent(&self, name: &str, id: &str) -> Option<&AgentSettings> {
        self.agents.get(name).or_else(|| self.agents.get(id))
    }
}

/// The HTTP listener and what one request or connection may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub host: IpAddr,
    pub port: Option<u16>,
    pub io_threads: Option<usize>,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub header_read_timeout_s: f64,
    pub max_header_bytes: usize,
    pub cors_origins: Vec<String>,
    pub ws_start_timeout_s: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: None,
            io_threads: None,
            max_body_bytes: 10 * 1024 * 1024,
            max_connections: 4096,
            header_read_timeout_s: 30.0,
            max_header_bytes: 64 * 1024,
            cors_origins: Vec::new(),
            ws_start_timeout_s: 60.0,
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("http.header_read_timeout_s", self.header_read_timeout_s)?;
        positive_secs("http.ws_start_timeout_s", self.ws_start_timeout_s)?;
        if self.io_threads == Some(0) {
            return Err(bad("http.io_threads", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(bad("http.max_connections", "must be at least 1"));
        }
        if self.max_header_bytes < 1024 {
            return Err(bad("http.max_header_bytes", "must be at least 1024"));
        }
        if self.max_body_bytes == 0 {
            return Err(bad("http.max_body_bytes", "must be at least 1"));
        }
        Ok(())
    }

    /// Threads serving HTTP: as configured, else half the cores (the rest run Python).
    pub fn io_threads(&self) -> usize {
        self.io_threads.unwrap_or(cores() / 2).max(1)
    }

    pub fn header_read_timeout(&self) -> Duration {
        secs_or(self.header_read_timeout_s, Duration::from_secs(30))
    }

    pub fn ws_start_timeout(&self) -> Duration {
        secs_or(self.ws_start_timeout_s, Duration::from_secs(60))
    }
}

/// The Python worker processes and the calls they run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    pub count: Option<usize>,
    pub python: Option<PathBuf>,
    pub max_async_per_worker: usize,
    pub pipeline_depth: usize,
    pub pipeline_below_ms: f64,
    pub timeout_s: f64,
    pub max_timeout_s: f64,
    pub max_frame_bytes: usize,
    pub memory_mb: Option<u64>,
    pub stream_window: u32,
    pub start_timeout_s: f64,
    pub call_cancel_grace_s: f64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            count: None,
            python: None,
            max_async_per_worker: 64,
            pipeline_depth: 8,
            pipeline_below_ms: 5.0,
            timeout_s: 300.0,
            max_timeout_s: 3600.0,
            max_frame_bytes: 16 * 1024 * 1024,
            memory_mb: None,
            stream_window: 64,
            start_timeout_s: 60.0,
            call_cancel_grace_s: 2.0,
        }
    }
}

impl WorkersConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("workers.timeout_s", self.timeout_s)?;
        positive_secs("workers.max_timeout_s", self.max_timeout_s)?;
        positive_secs("workers.start_timeout_s", self.start_timeout_s)?;
        positive_secs("workers.call_cancel_grace_s", self.call_cancel_grace_s)?;
        if !(self.pipeline_below_ms.is_finite() && self.pipeline_below_ms >= 0.0) {
            return Err(bad("workers.pipeline_below_ms", "must be >= 0"));
        }
        for (key, n) in [
            ("workers.count", self.count.unwrap_or(1)),
            ("workers.max_async_per_worker", self.max_async_per_worker),
            ("workers.pipeline_depth", self.pipeline_depth),
        ] {
            if n == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if self.max_frame_bytes < 1024 {
            return Err(bad("workers.max_frame_bytes", "must be at least 1024"));
        }
        if self.stream_window < 2 {
            return Err(bad("workers.stream_window", "must be at least 2"));
        }
        if self.memory_mb == Some(0) {
            return Err(bad("workers.memory_mb", "must be at least 1"));
        }
        Ok(())
    }

    /// Warm workers per agent: as configured, else the number of cores.
    pub fn count(&self) -> usize {
        self.count.unwrap_or_else(cores).max(1)
    }

    pub fn default_timeout(&self) -> Duration {
        secs_or(self.timeout_s, Duration::from_secs(300))
    }

    pub fn max_timeout(&self) -> Duration {
        secs_or(self.max_timeout_s, Duration::from_secs(3600))
    }

    pub fn pipeline_below(&self) -> Duration {
        Duration::try_from_secs_f64(self.pipeline_below_ms / 1000.0).unwrap_or_default()
    }

    pub fn start_timeout(&self) -> Duration {
        secs_or(self.start_timeout_s, Duration::from_secs(60))
    }

    pub fn call_cancel_grace(&self) -> Duration {
        secs_or(self.call_cancel_grace_s, Duration::from_secs(2))
    }

    pub fn memory_limit_bytes(&self) -> Option<u64> {
        self.memory_mb.map(|mb| mb.saturating_mul(1024 * 1024))
    }

    /// The deadline of one call: the request's, else the entrypoint's, else the default,
    /// never more than the maximum. Non-positive or non-finite requests are ignored.
    pub fn call_timeout(&self, requested_s: Option<f64>, entrypoint_s: Option<f64>) -> Duration {
        // In seconds first: one conversion to a duration per call (this is on the invoke path).
        let max_s = self.max_timeout_s;
        let pick_s = requested_s
            .filter(|s| s.is_finite() && *s > 0.0)
            .or(entrypoint_s)
            .unwrap_or(self.timeout_s)
            .min(max_s);
        Duration::try_from_secs_f64(pick_s).unwrap_or_else(|_| self.max_timeout())
    }
}

/// Callbacks: how runs' `callback_url`s are delivered (`docs/callbacks.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbacksConfig {
    /// The signing secret (`whsec_<base64>` or any text); `None`: `secret_file`, else one made
    /// at the first start and kept in the state directory.
    pub secret: Option<String>,
    /// A file holding the signing secret.
    pub secret_file: Option<PathBuf>,
    /// Attempts per round (a re-send starts another).
    pub max_attempts: u32,
    /// One attempt's deadline, from connecting to the last byte of the answer.
    pub timeout_s: f64,
    /// The wait after the first failed attempt; it doubles after each (with jitter).
    pub retry_base_s: f64,
    /// The longest wait between two attempts.
    pub retry_max_s: f64,
    /// Deliver to loopback, private and link-local addresses too.
    pub allow_private: bool,
    /// How often a node looks for callbacks due.
    pub poll_ms: u64,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            max_attempts: 8,
            timeout_s: 10.0,
            retry_base_s: 2.0,
            retry_max_s: 600.0,
            allow_private: false,
            poll_ms: 500,
        }
    }
}

impl CallbacksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100).contains(&self.max_attempts) {
            return Err(bad("callbacks.max_attempts", "must be from 1 to 100"));
        }
        positive_secs("callbacks.timeout_s", self.timeout_s)?;
        positive_secs("callbacks.retry_base_s", self.retry_base_s)?;
        positive_secs("callbacks.retry_max_s", self.retry_max_s)?;
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err(bad("callbacks.poll_ms", "must be from 10 to 60000"));
        }
        if self.secret.as_deref() == Some("") {
            return Err(bad("callbacks.secret", "must not be empty"));
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        secs_or(self.timeout_s, Duration::from_secs(10))
    }
    pub fn retry_base(&self) -> Duration {
        secs_or(self.retry_base_s, Duration::from_secs(2))
    }
    pub fn retry_max(&self) -> Duration {
        secs_or(self.retry_max_s, Duration::from_secs(600))
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

/// Event triggers (`docs/triggers.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggersConfig {
    /// The longest chain of triggered runs: an event of a run at this depth triggers nothing.
    pub max_depth: u32,
    /// How often a node reads the log for its triggers' events.
    pub poll_ms: u64,
}

impl Default for TriggersConfig {
    fn default() -> Self {
        Self {
            max_depth: 8,
            poll_ms: 200,
        }
    }
}

impl TriggersConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1000).contains(&self.max_depth) {
            return Err(bad("triggers.max_depth", "must be from 1 to 1000"));
        }
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err(bad("triggers.poll_ms", "must be from 10 to 60000"));
        }
        Ok(())
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

/// Calls Agentry makes to other servers: callbacks, remote executors, n8n webhooks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// A PEM file of root certificates trusted for `https://`, besides the system's.
    pub ca_file: Option<PathBuf>,
}

/// Schedules: their defaults and how nodes fire them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulesConfig {
    /// The IANA zone of cron expressions and English times that name none.
    pub default_timezone: String,
    /// A slot found later than this is missed (the node was down), and the schedule's
    /// missed-fire policy decides; a slot less late fires as usual.
    pub missed_after_s: f64,
    /// How often a node looks for schedules that another node (or the CLI) made or changed;
    /// its own are seen at once.
    pub poll_s: f64,
    /// Fire this node's share of due schedules (false: this node never fires any).
    pub enabled: bool,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        Self {
            default_timezone: "UTC".to_string(),
            missed_after_s: 60.0,
            poll_s: 1.0,
            enabled: true,
        }
    }
}

impl SchedulesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.default_timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(bad(
                "schedules.default_timezone",
                "must be an IANA time zone (e.g. `UTC`, `Europe/Berlin`)",
            ));
        }
        positive_secs("schedules.missed_after_s", self.missed_after_s)?;
        positive_secs("schedules.poll_s", self.poll_s)?;
        Ok(())
    }

    pub fn missed_after_ms(&self) -> i64 {
        (self.missed_after_s * 1000.0) as i64
    }

    pub fn poll(&self) -> Duration {
        secs_or(self.poll_s, Duration::from_secs(1))
    }
}

/// Durable runs: capacity, leases, cancellation, retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunsConfig {
    pub max_input_bytes: usize,
    pub max_running: usize,
    pub max_running_per_agent: Option<usize>,
    /// Runs leased at once across every node on the shared database, all agents together.
    pub cluster_max_running: Option<usize>,
    /// Runs of one agent leased at once across every node on the shared database.
    pub cluster_max_running_per_agent: Option<usize>,
    pub lease_ttl_s: f64,
    pub heartbeat_event_s: f64,
    pub cancel_grace_s: f64,
    pub retention_h: f64,
    /// Most events (chunks, `ctx.emit`, `ctx.log`) one attempt may write.
    pub max_events_per_attempt: u64,
    /// Most bytes of event data one attempt may write.
    pub max_event_bytes_per_attempt: u64,
}

impl Default for RunsConfig {
    fn default() -> Self {
        Self {
            max_input_bytes: 1024 * 1024,
            max_running: 1024,
            max_running_per_agent: None,
            cluster_max_running: None,
            cluster_max_running_per_agent: None,
            lease_ttl_s: 30.0,
            heartbeat_event_s: 30.0,
            cancel_grace_s: 5.0,
            retention_h: 168.0,
            max_events_per_attempt: 100_000,
            max_event_bytes_per_attempt: 64 * 1024 * 1024,
        }
    }
}

impl RunsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("runs.lease_ttl_s", self.lease_ttl_s)?;
        positive_secs("runs.heartbeat_event_s", self.heartbeat_event_s)?;
        positive_secs("runs.cancel_grace_s", self.cancel_grace_s)?;
        if !(self.retention_h.is_finite() && self.retention_h >= 0.0) {
            return Err(bad("runs.retention_h", "must be a number of hours >= 0"));
        }
        if self.retention_h > 0.0 {
            positive_secs("runs.retention_h", self.retention_h * 3600.0)?;
        }
        if self.max_running_per_agent == Some(0) {
            return Err(bad("runs.max_running_per_agent", "must be at least 1"));
        }
        if self.cluster_max_running == Some(0) {
            return Err(bad("runs.cluster_max_running", "must be at least 1"));
        }
        if self.cluster_max_running_per_agent == Some(0) {
            return Err(bad(
                "runs.cluster_max_running_per_agent",
                "must be at least 1",
            ));
        }
        if self.max_input_bytes == 0 {
            return Err(bad("runs.max_input_bytes", "must be at least 1"));
        }
        Ok(())
    }

    pub fn lease_ttl(&self) -> Duration {
        secs_or(self.lease_ttl_s, Duration::from_secs(30))
    }

    /// Leases are renewed every third of their lifetime.
    pub fn heartbeat_every(&self) -> Duration {
        self.lease_ttl() / 3
    }

    /// Expired leases of other nodes are looked for every sixth of the lifetime (at most
    /// five times a second).
    pub fn reap_every(&self) -> Duration {
        (self.lease_ttl() / 6).max(Duration::from_millis(200))
    }

    pub fn heartbeat_event_every(&self) -> Duration {
        secs_or(self.heartbeat_event_s, Duration::from_secs(30))
    }

    pub fn cancel_grace(&self) -> Duration {
        secs_or(self.cancel_grace_s, Duration::from_secs(5))
    }

    /// How long finished runs are kept; `None`: forever.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_h > 0.0)
            .then(|| Duration::try_from_secs_f64(self.retention_h * 3600.0).ok())
            .flatten()
    }

    /// How often retention looks for old runs: a quarter of the retention age, between 0.1 s
    /// and a minute.
    pub fn retention_every(&self) -> Duration {
        self.retention().map_or(Duration::from_secs(60), |r| {
            (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
        })
    }
}

/// The run database and RunAgent's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub path: Option<PathBuf>,
    /// A `postgres://` URL: runs and API keys live there, shared by every node that names it,
    /// instead of in the SQLite file `path`.
    pub database_url: Option<String>,
    /// The PostgreSQL schema the tables go in (created if missing); `None`: the URL's default.
    pub database_schema: Option<String>,
    /// PostgreSQL connections this node keeps at most.
    pub database_max_connections: u32,
    /// Batches of each kind (creations, attempts' ends, reads) on the wire at once.
    pub database_batches_in_flight: u32,
    pub fsync: bool,
    pub busy_timeout_s: f64,
    pub runagent_db: bool,
    pub runagent_db_path: Option<PathBuf>,
    /// Most rows of RunAgent's invocation history kept (0: no bound).
    pub runagent_history_max_rows: u64,
    /// Oldest invocation kept, in seconds (0: no bound).
    pub runagent_history_max_age_s: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: None,
            database_url: None,
            database_schema: None,
            database_max_connections: 16,
            database_batches_in_flight: 1,
            fsync: true,
            busy_timeout_s: 5.0,
            runagent_db: true,
            runagent_db_path: None,
            runagent_history_max_rows: 100_000,
            runagent_history_max_age_s: 7.0 * 86_400.0,
        }
    }
}

/// A PostgreSQL schema name Agentry accepts: lowercase letters, digits and `_`, at most 63, not
/// starting with a digit. Safe to put into SQL unquoted (it cannot be a bind parameter).
pub fn is_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("store.busy_timeout_s", self.busy_timeout_s)?;
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(bad("store.database_url", "must be a postgres:// URL"));
        }
        if let Some(schema) = &self.database_schema
            && !is_schema_name(schema)
        {
            return Err(bad(
                "store.database_schema",
                "must be lowercase letters, digits and _ (at most 63, not starting with a digit)",
            ));
        }
        if self.database_max_connections == 0 {
            return Err(bad("store.database_max_connections", "must be at least 1"));
        }
        if self.database_batches_in_flight == 0
            || (self.database_url.is_some()
                && self.database_batches_in_flight.saturating_mul(3)
                    >= self.database_max_connections)
        {
            return Err(bad(
                "store.database_batches_in_flight",
                "must be at least 1, and three times it (one per kind) below store.database_max_connections",
            ));
        }
        if !(self.runagent_history_max_age_s >= 0.0 && self.runagent_history_max_age_s.is_finite())
        {
            return Err(bad(
                "store.runagent_history_max_age_s",
                "must be 0 (no bound) or a positive number of seconds",
            ));
        }
        Ok(())
    }

    /// The run database: as configured, else `<state_dir>/agentry.db`.
    pub fn runs_db_path(&self, state_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| state_dir.join("agentry.db"))
    }

    pub fn busy_timeout(&self) -> Duration {
        secs_or(self.busy_timeout_s, Duration::from_secs(5))
    }

    /// The invocation history's bounds: at most this many rows, none older than this.
    pub fn runagent_history_bounds(&self) -> (Option<u64>, Option<Duration>) {
        let rows = (self.runagent_history_max_rows > 0).then_some(self.runagent_history_max_rows);
        let age = (self.runagent_history_max_age_s > 0.0)
            .then(|| Duration::from_secs_f64(self.runagent_history_max_age_s));
        (rows, age)
    }
}

/// When API keys are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Required once any key exists.
    Auto,
    /// Always, even before the first key exists.
    Required,
}

/// Authentication, rate limits and what errors may show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub auth: AuthMode,
    pub insecure_no_auth: bool,
    pub expose_tracebacks: bool,
    pub rate_limits: Vec<String>,
    pub agent_rate_limits: Vec<String>,
    pub rate_limit_postgres: Option<String>,
    pub rate_limit_sync_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            auth: AuthMode::Auto,
            insecure_no_auth: false,
            expose_tracebacks: false,
            rate_limits: Vec::new(),
            agent_rate_limits: Vec::new(),
            rate_limit_postgres: None,
            rate_limit_sync_ms: 100,
        }
    }
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.caller_rate_limits()?;
        self.per_agent_rate_limits()?;
        if !(10..=60_000).contains(&self.rate_limit_sync_ms) {
            return Err(bad(
                "gateway.rate_limit_sync_ms",
                "must be from 10 to 60000 milliseconds",
            ));
        }
        if let Some(url) = &self.rate_limit_postgres
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(bad(
                "gateway.rate_limit_postgres",
                "must be a postgres:// URL",
            ));
        }
        Ok(())
    }

    fn rules(key: &str, list: &[String]) -> Result<Vec<(String, RateSpec)>, ConfigError> {
        list.iter()
            .map(|r| RateSpec::parse_rule(r).map_err(|m| bad(key, m)))
            .collect()
    }

    /// The rate limits per caller (API key, or client IP without authentication).
    pub fn caller_rate_limits(&self) -> Result<Vec<(String, RateSpec)>, ConfigError> {
        Self::rules("gateway.rate_limits", &self.rate_limits)
    }

    /// The rate limits per agent.
    pub fn per_agent_rate_limits(&self) -> Result<Vec<(String, RateSpec)>, ConfigError> {
        Self::rules("gateway.agent_rate_limits", &self.agent_rate_limits)
    }

    pub fn auth_required(&self) -> bool {
        self.auth == AuthMode::Required
    }

    pub fn rate_limit_sync(&self) -> Duration {
        Duration::from_millis(self.rate_limit_sync_ms.clamp(10, 60_000))
    }
}

/// Settings of one agent, in `agentry.toml` under `[agents.<name>]`. They win over the agent
/// folder's own `agentry` key, and over the global settings unless those were given on the
/// command line or in the environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    pub workers: Option<usize>,
    pub python: Option<PathBuf>,
    pub timeout_s: Option<f64>,
    pub memory_mb: Option<u64>,
    pub max_running_runs: Option<usize>,
    /// Run this agent's code on another server instead of local workers (`docs/executors.md`).
    pub remote: Option<RemoteSettings>,
    /// Executors a run or schedule may name (`"executor": "<name>"`) instead of the default.
    pub executors: BTreeMap<String, RemoteSettings>,
    pub entrypoints: BTreeMap<String, EntrypointSettings>,
}

/// Where a remote agent's calls go, under `[agents.<name>.remote]` (`docs/executors.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSettings {
    /// The other server's base URL (`http://10.0.0.7:8450`): another `agentry serve`, or any
    /// server that speaks RunAgent's local-server protocol.
    pub url: String,
    /// The agent's id there; default: the `agent_id` of the local `runagent.config.json`.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Calls, streams and durable runs in flight to the server from this node (default 8).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// The environment variable holding the API key sent to the server (`Authorization:
    /// Bearer`); never the key itself, which must not sit in a committed file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// A file holding that API key (trailing whitespace ignored).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
}

/// Settings of one entrypoint, under `[agents.<name>.entrypoints.<tag>]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EntrypointSettings {
    pub timeout_s: Option<f64>,
    /// The default priority of its runs (a run or schedule that gives one wins).
    pub priority: Option<i32>,
    /// At most this many of its durable runs run at once, across the nodes of a shared store.
    pub max_concurrency: Option<usize>,
    /// A webhook that starts a run of this entrypoint (`docs/webhooks.md`).
    pub webhook: Option<crate::webhooks::WebhookSettings>,
    /// Runs of this entrypoint start on other runs' events (`docs/triggers.md`).
    pub event: Option<crate::triggers::EventTriggerSettings>,
    /// More event triggers of this entrypoint (`[[…entrypoints.<tag>.events]]`), each with a
    /// `name` unique among them.
    pub events: Vec<crate::triggers::EventTriggerSettings>,
    /// Schedules of this entrypoint, declared here (`docs/schedules.md`, "Timers"): each the
    /// fields of `POST /v1/schedules` but `agent` and `entrypoint`, with a `name`.
    pub timers: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl AgentSettings {
    /// These settings over `lower` (an agent folder's `agentry.agent.toml`): each one set
    /// here wins, the rest come from `lower`; an entrypoint's timers and its named `events`
    /// come from one side only (a list here replaces the file's).
    pub fn over(mut self, lower: AgentSettings) -> AgentSettings {
        self.workers = self.workers.or(lower.workers);
        self.python = self.python.or(lower.python);
        self.timeout_s = self.timeout_s.or(lower.timeout_s);
        self.memory_mb = self.memory_mb.or(lower.memory_mb);
        self.max_running_runs = self.max_running_runs.or(lower.max_running_runs);
        self.remote = self.remote.take().or(lower.remote);
        for (name, e) in lower.executors {
            self.executors.entry(name).or_insert(e);
        }
        for (tag, low) in lower.entrypoints {
            let e = self.entrypoints.entry(tag).or_default();
            e.timeout_s = e.timeout_s.or(low.timeout_s);
            e.priority = e.priority.or(low.priority);
            e.max_concurrency = e.max_concurrency.or(low.max_concurrency);
            e.webhook = e.webhook.take().or(low.webhook);
            e.event = e.event.take().or(low.event);
            if e.events.is_empty() {
                e.events = low.events;
            }
            if e.timers.is_empty() {
                e.timers = low.timers;
            }
        }
        self
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.workers == Some(0) {
            return Err(bad(&format!("{at}.workers"), "must be at least 1"));
        }
        if self.max_running_runs == Some(0) {
            return Err(bad(&format!("{at}.max_running_runs"), "must be at least 1"));
        }
        if self.memory_mb == Some(0) {
            return Err(bad(&format!("{at}.memory_mb"), "must be at least 1"));
        }
        if let Some(t) = self.timeout_s {
            positive_secs(&format!("{at}.timeout_s"), t)?;
        }
        for (tag, e) in &self.entrypoints {
            if let Some(t) = e.timeout_s {
                positive_secs(&format!("{at}.entrypoints.{tag}.timeout_s"), t)?;
            }
            if let Some(hook) = &e.webhook {
                validate_webhook(&format!("{at}.entrypoints.{tag}.webhook"), hook)?;
            }
            // Each of `events` is told apart by its name (in its runs' idempotency keys and
            // its cursor); `event` is the one without.
            let mut names = std::collections::BTreeSet::new();
            for (i, t) in e.events.iter().enumerate() {
                let at = format!("{at}.entrypoints.{tag}.events[{i}].name");
                match t.name.as_deref() {
                    None => return Err(bad(&at, "each of `events` needs a name")),
                    Some(n) if !crate::triggers::valid_name(n) => {
                        return Err(bad(&at, "1 to 64 letters, digits, `-` or `_`"));
                    }
                    Some(n) if !names.insert(n) => {
                        return Err(bad(&at, "another of this entrypoint's `events` has it"));
                    }
                    Some(_) => {}
                }
            }
            if e.event.as_ref().is_some_and(|t| t.name.is_some()) {
                return Err(bad(
                    &format!("{at}.entrypoints.{tag}.event.name"),
                    "`event` takes no name; named triggers go in `events`",
                ));
            }
        }
        Ok(())
    }
}

/// A webhook's settings on their own; names unique across agents are checked by
/// `Config::validate`.
fn validate_webhook(at: &str, hook: &crate::webhooks::WebhookSettings) -> Result<(), ConfigError> {
    if !crate::webhooks::valid_name(&hook.name) {
        return Err(bad(
            &format!("{at}.name"),
            "must be 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        ));
    }
    match (&hook.secret_env, &hook.secret_file) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(bad(
                &format!("{at}.secret_env"),
                "give exactly one of `secret_env` (a variable's name) and `secret_file` (a path); a secret is never written inline",
            ));
        }
        (Some(var), None) if var.is_empty() => {
            return Err(bad(&format!("{at}.secret_env"), "must name a variable"));
        }
        _ => {}
    }
    if !(1..=86_400).contains(&hook.tolerance_s) {
        return Err(bad(
            &format!("{at}.tolerance_s"),
            "must be from 1 to 86400 seconds",
        ));
    }
    if hook.max_body_bytes == Some(0) {
        return Err(bad(&format!("{at}.max_body_bytes"), "must be at least 1"));
    }
    for (param, path) in &hook.input {
        crate::webhooks::parse_path(path).map_err(|m| bad(&format!("{at}.input.{param}"), m))?;
    }
    Ok(())
}

/// How a setting's environment variable or flag turns into its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A number.
    Number,
    /// A boolean: a flag without a value; in the environment, anything but an empty value,
    /// `0`, `false`, `no` or `off` is true.
    Flag,
    /// Text (a path, a name, a URL), taken as it is written.
    Text,
    /// A list: comma-separated in the environment, repeatable on the command line.
    List,
    /// A boolean whose variable or flag says the opposite (`--no-runagent-db`).
    Negated,
}

/// One setting: where it is in `agentry.toml`, its flag and variable, and what it means.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The dotted key (`runs.lease_ttl_s`).
    pub key: &'static str,
    /// The `agentry serve` flag, without dashes.
    pub flag: Option<&'static str>,
    pub env: Option<&'static str>,
    pub kind: FieldKind,
    /// Never printed (`config show` redacts it).
    pub secret: bool,
    /// The default, when `Config::default()` cannot say it (it depends on the machine or on
    /// other settings).
    pub default_doc: Option<&'static str>,
    pub doc: &'static str,
}

const fn field(
    key: &'static str,
    flag: &'static str,
    env: &'static str,
    doc: &'static str,
) -> Field {
    Field {
        key,
        flag: Some(flag),
        env: Some(env),
        kind: FieldKind::Number,
        secret: false,
        default_doc: None,
        doc,
    }
}

const fn file_only(key: &'static str, doc: &'static str) -> Field {
    Field {
        key,
        flag: None,
        env: None,
        kind: FieldKind::Number,
        secret: false,
        default_doc: None,
        doc,
    }
}

impl Field {
    const fn flag(mut self) -> Self {
        self.kind = FieldKind::Flag;
        self
    }
    const fn text(mut self) -> Self {
        self.kind = FieldKind::Text;
        self
    }
    const fn list(mut self) -> Self {
        self.kind = FieldKind::List;
        self
    }
    const fn negated(mut self) -> Self {
        self.kind = FieldKind::Negated;
        self
    }
    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
    const fn default_doc(mut self, text: &'static str) -> Self {
        self.default_doc = Some(text);
        self
    }
    const fn no_flag(mut self) -> Self {
        self.flag = None;
        self
    }
    const fn no_env(mut self) -> Self {
        self.env = None;
        self
    }

    /// The field with this dotted key.
    pub fn find(key: &str) -> Option<&'static Field> {
        FIELDS.iter().find(|f| f.key == key)
    }
}

/// Every setting of [`Config`] but the per-agent table, in documentation order.
pub const FIELDS: &[Field] = &[
    file_only("agent_dirs", "agent folders to serve; on the command line, the `PATH...` of `agentry serve` (which replace the file's)")
        .list()
        .default_doc("none"),
    field("state_dir", "state-dir", "AGENTRY_STATE_DIR", "Agentry's state: the run database, the node id, the worker shim, the remembered interpreter probes")
        .text(),
    field("node_name", "node-name", "AGENTRY_NODE_NAME", "this node's name in run leases; a restarted node requeues its previous life's runs at once")
        .text()
        .default_doc("a random id kept in `<state_dir>/node-id`"),
    field("shutdown_grace_s", "shutdown-grace-s", "AGENTRY_SHUTDOWN_GRACE_S", "time in-flight calls and runs get after SIGINT/SIGTERM"),
    field("http.host", "host", "AGENTRY_HOST", "address to bind; a non-loopback address needs an API key to exist (or `--insecure-no-auth`)")
        .text(),
    field("http.port", "port", "AGENTRY_PORT", "port; `0` picks any; without it, the first free port from 8450 up that no agent in RunAgent's database has recorded (RunAgent's own policy; an explicit port that is taken is an error, not a fallback)")
        .default_doc("RunAgent's policy"),
    field("http.io_threads", "io-threads", "AGENTRY_IO_THREADS", "threads serving HTTP; the other cores are left to the Python workers")
        .default_doc("half the cores, at least 1"),
    field("http.max_body_bytes", "max-body-bytes", "AGENTRY_MAX_BODY_BYTES", "largest request body (413 beyond), and largest WebSocket frame and message (the connection is closed with 1009 beyond); a run-event WebSocket takes at most 64 KiB from its client"),
    field("http.max_connections", "max-connections", "AGENTRY_MAX_CONNECTIONS", "connections open at once; further ones wait in the kernel's backlog until one closes"),
    field("http.header_read_timeout_s", "header-read-timeout-s", "AGENTRY_HEADER_READ_TIMEOUT_S", "time a client has to send a request's headers, counted from when the server starts waiting for them: slow clients and idle keep-alive connections are closed after it"),
    field("http.max_header_bytes", "max-header-bytes", "AGENTRY_MAX_HEADER_BYTES", "largest request head (request line and headers); 431 beyond it"),
    field("http.cors_origins", "cors-origin", "AGENTRY_CORS_ORIGINS", "an origin browsers may call the API from (repeatable or comma-separated; `*` for any); none: CORS off. Preflights are answered before authentication; `Authorization`, `Content-Type` and `Last-Event-ID` may be sent, `Location`, `Retry-After`, `RateLimit-*` and `Idempotent-Replayed` are exposed")
        .list(),
    file_only("http.ws_start_timeout_s", "time a WebSocket client has to send its start frame"),
    field("workers.count", "workers", "AGENTRY_WORKERS", "warm workers per agent")
        .default_doc("the number of cores"),
    field("workers.python", "python", "AGENTRY_PYTHON", "interpreter for every agent (see \"Which Python runs an agent\")")
        .text()
        .default_doc("discovered"),
    field("workers.max_async_per_worker", "max-async-per-worker", "AGENTRY_MAX_ASYNC_PER_WORKER", "async calls sharing one worker"),
    field("workers.pipeline_depth", "pipeline-depth", "AGENTRY_PIPELINE_DEPTH", "short sync calls that may queue on one busy worker (1 turns pipelining off); see docs/architecture.md"),
    file_only("workers.pipeline_below_ms", "only entrypoints whose calls average less than this are pipelined"),
    field("workers.timeout_s", "timeout-s", "AGENTRY_TIMEOUT_S", "default call deadline"),
    field("workers.max_timeout_s", "max-timeout-s", "AGENTRY_MAX_TIMEOUT_S", "cap on any requested deadline"),
    field("workers.max_frame_bytes", "max-frame-bytes", "AGENTRY_MAX_FRAME_BYTES", "largest worker frame: one result or chunk"),
    field("workers.memory_mb", "worker-memory-mb", "AGENTRY_WORKER_MEMORY_MB", "`RLIMIT_AS` per worker; a hog gets `MemoryError`")
        .default_doc("none"),
    file_only("workers.stream_window", "stream chunks a generator may run ahead of its client (the window starts at 4 and doubles while the client keeps up); a durable run's chunks, events and log lines ahead of the server together"),
    file_only("workers.start_timeout_s", "time a worker has to import its agent and become ready"),
    file_only("workers.call_cancel_grace_s", "time a call whose client left (or a stream that was cancelled) gets to stop before its worker is killed"),
    field("runs.max_input_bytes", "max-run-input-bytes", "AGENTRY_MAX_RUN_INPUT_BYTES", "largest run input (413 beyond)"),
    field("runs.max_running", "max-running-runs", "AGENTRY_MAX_RUNNING_RUNS", "runs leased by this node at once, all agents together; `0`: this node executes no durable run (it accepts them for `agentry worker` nodes, and still serves sync calls)"),
    field("runs.max_running_per_agent", "max-running-runs-per-agent", "AGENTRY_MAX_RUNNING_RUNS_PER_AGENT", "runs of one agent leased at once; default: what its workers can start soon (`max_async_per_worker` each for an agent whose entrypoints are all async; otherwise 16 pipelines' worth each once its entrypoints are known to be short, else 2 each). A leased run waiting for a worker has not started: its timeout and its `run.started` wait for its code")
        .default_doc("workers × 16 × pipeline depth (sync agents), workers × async calls per worker (agents with async entrypoints)"),
    field("runs.cluster_max_running", "cluster-max-running-runs", "AGENTRY_CLUSTER_MAX_RUNNING_RUNS", "runs leased at once by all the nodes on the shared database together, all agents together (exact: counted in the claim, under one lock); needs `store.database_url`. Configure every node alike: each enforces its own setting. While a cluster cap is set, a new run is never leased in the commit that creates it")
        .default_doc("none"),
    field("runs.cluster_max_running_per_agent", "cluster-max-running-runs-per-agent", "AGENTRY_CLUSTER_MAX_RUNNING_RUNS_PER_AGENT", "runs of one agent leased at once by all the nodes on the shared database together (exact, as above); needs `store.database_url`")
        .default_doc("none"),
    field("runs.lease_ttl_s", "lease-ttl-s", "AGENTRY_LEASE_TTL_S", "a run lease's lifetime; renewed every third of it; a node silent for longer loses its runs to other nodes' reapers (checked every sixth of it)"),
    field("runs.heartbeat_event_s", "heartbeat-event-s", "AGENTRY_HEARTBEAT_EVENT_S", "least time between two `run.heartbeat` events of a run"),
    field("runs.cancel_grace_s", "cancel-grace-s", "AGENTRY_CANCEL_GRACE_S", "time a cancelled running run gets to stop before its worker is killed"),
    field("runs.retention_h", "run-retention-h", "AGENTRY_RUN_RETENTION_H", "hours finished runs (with events and checkpoints) are kept; 0 keeps them forever"),
    field("runs.max_events_per_attempt", "max-events-per-attempt", "AGENTRY_MAX_EVENTS_PER_ATTEMPT", "most events (chunks, `ctx.emit`, `ctx.log`) one attempt of a run may write; beyond it the attempt is stopped and the run fails with `payload_too_large`"),
    field("runs.max_event_bytes_per_attempt", "max-event-bytes-per-attempt", "AGENTRY_MAX_EVENT_BYTES_PER_ATTEMPT", "most bytes of event data one attempt may write (64 MiB); beyond it the attempt is stopped and the run fails with `payload_too_large`"),
    field("schedules.default_timezone", "default-timezone", "AGENTRY_DEFAULT_TIMEZONE", "the IANA time zone of schedules that name none (cron expressions, English one-shot times)")
        .text(),
    field("schedules.missed_after_s", "schedule-missed-after-s", "AGENTRY_SCHEDULE_MISSED_AFTER_S", "a schedule's slot found later than this (the nodes were down) is missed: its `missed` policy decides (`skip`, `once`, `all`); a slot less late fires as usual"),
    field("schedules.poll_s", "schedule-poll-s", "AGENTRY_SCHEDULE_POLL_S", "how often a node looks for schedules made or changed elsewhere (another node, the CLI); its own changes are seen at once"),
    field("callbacks.secret", "callback-secret", "AGENTRY_CALLBACK_SECRET", "the secret callbacks are signed with (Standard Webhooks; `whsec_<base64>` or any text); every node of a cluster needs the same one. Never logged")
        .text()
        .secret()
        .no_flag()
        .default_doc("`callbacks.secret_file`, else one made at the first start in the state directory (`callback-secret`)"),
    field("callbacks.secret_file", "callback-secret-file", "AGENTRY_CALLBACK_SECRET_FILE", "a file holding the callback signing secret")
        .text(),
    field("callbacks.max_attempts", "callback-max-attempts", "AGENTRY_CALLBACK_MAX_ATTEMPTS", "attempts to deliver a run's callback (1 to 100) before it is marked failed; a re-send starts another round"),
    field("callbacks.timeout_s", "callback-timeout-s", "AGENTRY_CALLBACK_TIMEOUT_S", "one delivery attempt's deadline"),
    field("callbacks.retry_base_s", "callback-retry-base-s", "AGENTRY_CALLBACK_RETRY_BASE_S", "the wait after a failed attempt: doubled after each, at most `callbacks.retry_max_s`, times a jitter from 0.5 to 1"),
    field("callbacks.retry_max_s", "callback-retry-max-s", "AGENTRY_CALLBACK_RETRY_MAX_S", "the longest wait between two attempts"),
    field("callbacks.allow_private", "allow-private-callbacks", "AGENTRY_ALLOW_PRIVATE_CALLBACKS", "deliver callbacks to loopback, private and link-local addresses (refused by default: checked on the address connected to, after DNS)")
        .flag(),
    field("callbacks.poll_ms", "callback-poll-ms", "AGENTRY_CALLBACK_POLL_MS", "how often a node looks for callbacks due (10 to 60000)"),
    field("triggers.max_depth", "trigger-max-depth", "AGENTRY_TRIGGER_MAX_DEPTH", "the longest chain of runs started by event triggers (1 to 1000): an event of a run this deep triggers nothing, which stops cycles"),
    field("triggers.poll_ms", "trigger-poll-ms", "AGENTRY_TRIGGER_POLL_MS", "how often a node reads the event log for its triggers (10 to 60000)"),
    field("outbound.ca_file", "outbound-ca-file", "AGENTRY_OUTBOUND_CA_FILE", "a PEM file of root certificates trusted for `https://` calls (callbacks, remote executors, n8n webhooks) besides the system's trust store (always used, read at start-up; `SSL_CERT_FILE` or `SSL_CERT_DIR` replace it): add a CA there for every program, or here for Agentry alone")
        .text()
        .default_doc("none: the system's trust store"),
    field("schedules.enabled", "no-schedules", "AGENTRY_NO_SCHEDULES", "fire due schedules on this node; the flag turns it off (the node still serves the schedules API)")
        .negated(),
    field("store.path", "runs-db", "AGENTRY_RUNS_DB", "the run database (SQLite, WAL)")
        .text()
        .default_doc("`<state_dir>/agentry.db`"),
    field("store.database_url", "database", "AGENTRY_DATABASE_URL", "a `postgres://` URL: runs and API keys live in PostgreSQL, shared by every node started with it, instead of in `store.path`; `?sslmode=require` for TLS. Never logged")
        .text()
        .secret()
        .default_doc("none (SQLite)"),
    field("store.database_schema", "database-schema", "AGENTRY_DATABASE_SCHEMA", "the PostgreSQL schema for Agentry's tables (created if missing), so that one database can hold several independent deployments")
        .text()
        .default_doc("the URL's default (`public`)"),
    field("store.database_max_connections", "database-max-connections", "AGENTRY_DATABASE_MAX_CONNECTIONS", "PostgreSQL connections this node keeps at most"),
    field("store.database_batches_in_flight", "database-batches-in-flight", "AGENTRY_DATABASE_BATCHES_IN_FLIGHT", "PostgreSQL group commit: batches of each kind (runs created, attempts ended, runs read) sent at once; what arrives meanwhile joins the next batch. One was fastest on a 2-core machine whose CPU the database shares (BENCHMARKS.md); a database on its own, larger machine may take more"),
    field("store.fsync", "runs-db-no-fsync", "AGENTRY_RUNS_DB_NO_FSYNC", "fsync every commit of the run database (`synchronous=FULL`); the flag turns it off: runs then survive a crash of the server, not a power loss")
        .negated(),
    field("store.busy_timeout_s", "runs-db-busy-timeout-s", "AGENTRY_RUNS_DB_BUSY_TIMEOUT_S", "how long a write waits for another process's lock on the database before the request gets 503"),
    field("store.runagent_db", "no-runagent-db", "AGENTRY_NO_RUNAGENT_DB", "keep RunAgent's database up to date (discovery row, invocation history); the flag turns it off")
        .negated(),
    field("store.runagent_history_max_rows", "runagent-history-max-rows", "AGENTRY_RUNAGENT_HISTORY_MAX_ROWS", "most rows of RunAgent's invocation history kept (one per call on RunAgent's routes, about 0.5 KB each; 0: no bound); the oldest go first, pruned in small batches off the request path"),
    field("store.runagent_history_max_age_s", "runagent-history-max-age-s", "AGENTRY_RUNAGENT_HISTORY_MAX_AGE_S", "invocations older than this are pruned from RunAgent's history (0: no bound)"),
    field("store.runagent_db_path", "runagent-db", "AGENTRY_RUNAGENT_DB", "RunAgent's database file")
        .text()
        .default_doc("`$RUNAGENT_CACHE_DIR/runagent_local.db` (`~/.runagent/…`)"),
    field("gateway.auth", "auth", "AGENTRY_AUTH", "`auto`: API keys are required once one exists; `required`: always, even before the first")
        .text(),
    field("gateway.insecure_no_auth", "insecure-no-auth", "", "allow a non-loopback `--host` while authentication is off (no API key exists)")
        .flag()
        .no_env(),
    field("gateway.expose_tracebacks", "expose-tracebacks", "AGENTRY_EXPOSE_TRACEBACKS", "include Python tracebacks in native errors for every caller (development); admin keys always see them")
        .flag(),
    field("gateway.rate_limits", "rate-limit", "AGENTRY_RATE_LIMIT", "`CLASS=RATE[:BURST]` per caller (API key, or client IP without keys); classes `invoke`, `runs`, `hooks` (webhook deliveries, per sending IP), `other`; repeatable or comma-separated")
        .list(),
    field("gateway.agent_rate_limits", "agent-rate-limit", "AGENTRY_AGENT_RATE_LIMIT", "`CLASS=RATE[:BURST]` per agent")
        .list(),
    field("gateway.rate_limit_postgres", "rate-limit-postgres", "AGENTRY_RATE_LIMIT_POSTGRES", "a `postgres://` URL through which every node shares its rate limits (table `agentry_rate_buckets`, created on start), when it is not the run store's; with `store.database_url` set, limits are shared through that database without this. `?sslmode=require` for TLS. Never logged. Start-up fails if the database cannot be used")
        .text()
        .secret()
        .default_doc("the run store's database when it is PostgreSQL, else none (each node on its own)"),
    field("gateway.rate_limit_sync_ms", "rate-limit-sync-ms", "AGENTRY_RATE_LIMIT_SYNC_MS", "how often a node exchanges its use with the others (10 to 60000); the accuracy of shared limits depends on it (docs/api.md)"),
];

/// The settings of one agent after every layer: `agentry.toml`'s `[agents.<name>]`, the
/// folder's own `agentry` key, then the global settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedAgentSettings {
    pub workers: usize,
    /// An explicit interpreter and why it was chosen; `None`: discover one.
    pub python: Option<(PathBuf, &'static str)>,
    pub memory_limit_bytes: Option<u64>,
    pub max_running_runs: Option<usize>,
}

impl Config {
    /// Resolves one agent's settings: a global setting given on the command line or in the
    /// environment wins, then `[agents.<name>]`, then the folder's `agentry` key, then the
    /// global setting from `agentry.toml` or its default.
    pub fn resolve_agent(&self, agent: &crate::AgentConfig) -> ResolvedAgentSettings {
        let global_is_explicit = |key: &str| self.command_line_keys.contains(key);
        let own = self.agent(&agent.agent_name, &agent.agent_id);
        let folder = &agent.overrides;
        let workers = match self.workers.count {
            Some(n) if global_is_explicit("workers.count") => n,
            global => own
                .and_then(|a| a.workers)
                .or(folder.workers)
                .or(global)
                .unwrap_or_else(|| self.workers.count()),
        };
        let python = match &self.workers.python {
            Some(p) if global_is_explicit("workers.python") => {
                Some((p.clone(), "--python / AGENTRY_PYTHON"))
            }
            global => own
                .and_then(|a| a.python.as_ref())
                .map(|p| (agent.dir.join(p), "the agent's settings in agentry.toml"))
                .or_else(|| {
                    folder
                        .python
                        .as_ref()
                        .map(|p| (agent.dir.join(p), "the agent's `agentry.python` setting"))
                })
                .or_else(|| {
                    global
                        .clone()
                        .map(|p| (p, "`workers.python` in agentry.toml"))
                }),
        };
        let memory_mb = match self.workers.memory_mb {
            Some(m) if global_is_explicit("workers.memory_mb") => Some(m),
            global => own.and_then(|a| a.memory_mb).or(global),
        };
        let max_running_runs = match self.runs.max_running_per_agent {
            Some(n) if global_is_explicit("runs.max_running_per_agent") => Some(n),
            global => own.and_then(|a| a.max_running_runs).or(global),
        };
        ResolvedAgentSettings {
            workers: workers.max(1),
            python,
            memory_limit_bytes: memory_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
            max_running_runs,
        }
    }

    /// Applies `[agents.<name>]` timeouts to the agent's entrypoints (they win over the
    /// folder's own). Fails on a tag the agent does not have.
    pub fn apply_entrypoint_settings(
        &self,
        agent: &mut crate::AgentConfig,
    ) -> Result<(), ConfigError> {
        let Some(own) = self.agent(&agent.agent_name, &agent.agent_id).cloned() else {
            return Ok(());
        };
        for tag in own.entrypoints.keys() {
            if agent.entrypoint(tag).is_none() {
                return Err(bad(
                    &format!("agents.{}.entrypoints.{tag}", agent.agent_name),
                    format!("agent {} has no entrypoint with that tag", agent.agent_name),
                ));
            }
        }
        for e in &mut agent.entrypoints {
            if let Some(p) = own.entrypoints.get(&e.tag).and_then(|s| s.priority) {
                e.priority = Some(p);
            }
            if let Some(n) = own.entrypoints.get(&e.tag).and_then(|s| s.max_concurrency) {
                if n == 0 {
                    return Err(bad(
                        &format!(
                            "agents.{}.entrypoints.{}.max_concurrency",
                            agent.agent_name, e.tag
                        ),
                        "must be at least 1",
                    ));
                }
                e.max_concurrency = Some(n);
            }
            if let Some(t) = own.entrypoints.get(&e.tag).and_then(|s| s.timeout_s) {
                e.timeout_s = Some(t);
            } else if let Some(t) = own.timeout_s
                && agent
                    .overrides
                    .entrypoints
                    .get(&e.tag)
                    .and_then(|o| o.timeout_s)
                    .is_none()
            {
                e.timeout_s = Some(t);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_timeout_precedence_and_cap() {
        let s = WorkersConfig::default();
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

    #[test]
    fn each_of_an_entrypoints_events_needs_its_own_name() {
        use crate::triggers::EventTriggerSettings;
        let with = |event: Option<EventTriggerSettings>, events: Vec<EventTriggerSettings>| {
            let mut c = Config::default();
            let mut a = AgentSettings::default();
            a.entrypoints.insert(
                "t".into(),
                EntrypointSettings {
                    event,
                    events,
                    ..Default::default()
                },
            );
            c.agents.insert("a".into(), a);
            c.validate().map(|_| ()).map_err(|e| e.key)
        };
        let named = |n: &str| EventTriggerSettings {
            name: Some(n.into()),
            ..Default::default()
        };
        assert_eq!(
            with(Some(Default::default()), vec![named("x"), named("y")]),
            Ok(())
        );
        assert_eq!(
            with(None, vec![named("x"), Default::default()]),
            Err("agents.a.entrypoints.t.events[1].name".into())
        );
        assert_eq!(
            with(None, vec![named("x"), named("x")]),
            Err("agents.a.entrypoints.t.events[1].name".into())
        );
        assert_eq!(
            with(None, vec![named("no spaces")]),
            Err("agents.a.entrypoints.t.events[0].name".into())
        );
        assert_eq!(
            with(Some(named("x")), vec![]),
            Err("agents.a.entrypoints.t.event.name".into())
        );
        // Both come out of `event_triggers`, `event` first.
        let mut c = Config::default();
        let mut a = AgentSettings::default();
        a.entrypoints.insert(
            "t".into(),
            EntrypointSettings {
                event: Some(Default::default()),
                events: vec![named("x")],
                ..Default::default()
            },
        );
        c.agents.insert("a".into(), a);
        let names: Vec<Option<&str>> = c
            .event_triggers()
            .map(|(_, _, t)| t.name.as_deref())
            .collect();
        assert_eq!(names, [None, Some("x")]);
    }

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        Config::default().validate().unwrap();
        let mut c = Config::default();
        c.runs.lease_ttl_s = 0.0;
        assert_eq!(c.validate().unwrap_err().key, "runs.lease_ttl_s");
        // Executing nothing is for a node in front of workers, on a shared database only.
        let mut c = Config::default();
        c.runs.max_running = 0;
        assert_eq!(c.validate().unwrap_err().key, "runs.max_running");
        c.store.database_url = Some("postgres://db/agentry".into());
        c.validate().unwrap();
        // Cluster caps count across the nodes of a shared database, and are at least 1.
        let mut c = Config::default();
        c.runs.cluster_max_running_per_agent = Some(2);
        assert_eq!(
            c.validate().unwrap_err().key,
            "runs.cluster_max_running_per_agent"
        );
        c.store.database_url = Some("postgres://db/agentry".into());
        c.validate().unwrap();
        c.runs.cluster_max_running = Some(0);
        assert_eq!(c.validate().unwrap_err().key, "runs.cluster_max_running");
        let mut c = Config::default();
        c.gateway.rate_limits = vec!["bogus".into()];
        assert_eq!(c.validate().unwrap_err().key, "gateway.rate_limits");
        let mut c = Config::default();
        c.agents.insert(
            "echo".into(),
            AgentSettings {
                workers: Some(0),
                ..Default::default()
            },
        );
        assert_eq!(c.validate().unwrap_err().key, "agents.echo.workers");
    }

    /// Every leaf of the serialised default configuration is documented in `FIELDS`, once,
    /// and every documented key exists.
    #[test]
    fn fields_list_exactly_the_settings() {
        fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) if prefix != "agents" => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        leaves(&key, v, out);
                    }
                }
                _ if prefix == "agents" => {}
                _ => out.push(prefix.to_string()),
            }
        }
        let mut keys = Vec::new();
        leaves(
            "",
            &serde_json::to_value(Config::default()).unwrap(),
            &mut keys,
        );
        let mut documented: Vec<String> = FIELDS.iter().map(|f| f.key.to_string()).collect();
        keys.sort();
        documented.sort();
        assert_eq!(keys, documented);
        let mut flags: Vec<&str> = FIELDS
            .iter()
            .filter_map(|f| f.flag)
            .filter(|f| !f.is_empty())
            .collect();
        let n = flags.len();
        flags.sort_unstable();
        flags.dedup();
        assert_eq!(flags.len(), n, "a flag is used twice");
    }
}
