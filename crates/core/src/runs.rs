//! Durable runs: their states, the rules for moving between them, and the values the store and
//! the engine exchange. No I/O here; `store.rs` is the trait that persists these.
//!
//! A run goes `queued → running → succeeded | failed | timed_out | cancelled`; a retry takes it
//! from `running` back to `queued` (its attempt counter was already raised by the claim). Times
//! are Unix milliseconds: compact in the database and free of time-zone questions; the API shows
//! them as RFC 3339.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::events::EventKind;

/// Unix time in milliseconds, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The wall clock the run engine decides by (due times, lease expiries, retries): the system
/// clock, moved by `jump` in tests as NTP, a VM resume or an operator can move it. Leases are
/// kept by the monotonic clock on the node itself; only what is shared goes by this one.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Unix time in milliseconds, now, by this clock.
    pub fn now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves this clock (and every clone of it) forward by `by`.
    pub fn jump(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A new run id: `run_` and a UUIDv7, so ids sort by creation time.
pub fn new_run_id() -> String {
    format!("run_{}", uuid::Uuid::now_v7().simple())
}

/// Lost leases (the node running the attempt died) a run survives; after that it fails, so that
/// a run that brings its node down cannot do so forever.
pub const MAX_LEASE_LOSSES: u32 = 5;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    /// The event that records reaching this state.
    pub fn event(self) -> EventKind {
        match self {
            Self::Succeeded => EventKind::Succeeded,
            Self::Failed => EventKind::Failed,
            Self::TimedOut => EventKind::TimedOut,
            Self::Cancelled => EventKind::Cancelled,
            Self::Queued => EventKind::Queued,
            Self::Running => EventKind::Started,
        }
    }
}

/// Retry backoff: `min(base^attempt, max_s)` seconds, plus up to `jitter` of that at random,
/// so that runs failing together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "Backoff::default_base")]
    pub base: f64,
    #[serde(default = "Backoff::default_max_s")]
    pub max_s: f64,
    /// Fraction of the delay added at random (0 to 1).
    #[serde(default = "Backoff::default_jitter")]
    pub jitter: f64,
}

impl Backoff {
    fn default_base() -> f64 {
        2.0
    }
    fn default_max_s() -> f64 {
        300.0
    }
    fn default_jitter() -> f64 {
        0.1
    }

    /// Checks the numbers a client sent.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.base.is_finite() && self.base >= 1.0 && self.base <= 60.0) {
            return Err("backoff.base must be between 1 and 60".into());
        }
        if !(self.max_s.is_finite() && self.max_s >= 0.0 && self.max_s <= 86_400.0) {
            return Err("backoff.max_s must be between 0 and 86400".into());
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Err("backoff.jitter must be between 0 and 1".into());
        }
        Ok(())
    }

    /// The delay before the retry that follows failed attempt `attempt` (1-based), given a
    /// random number in [0, 1).
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exp = self.base.powi(attempt.min(64) as i32);
        let base = exp.min(self.max_s).max(0.0);
        let with_jitter = base * (1.0 + self.jitter * random.clamp(0.0, 1.0));
        Duration::try_from_secs_f64(with_jitter).unwrap_or(Duration::from_secs(86_400))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Self::default_base(),
            max_s: Self::default_max_s(),
            jitter: Self::default_jitter(),
        }
    }
}

/// A run as the client asked for it, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub agent: String,
    pub entrypoint: String,
    /// The keyword arguments, as a JSON object's text.
    pub input: String,
    pub idempotency_key: Option<String>,
    /// Whose idempotency keys `idempotency_key` is one of: the calling API key's id (empty while
    /// authentication is off). One tenant's keys never find, or squat, another's runs.
    pub idempotency_scope: String,
    /// A digest of the request, so that a reused idempotency key with another body is a conflict.
    pub request_hash: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    pub run_at: i64,
    pub timeout_ms: i64,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub concurrency_key: Option<String>,
    /// A JSON object's text, stored and returned as given.
    pub metadata: String,
    /// Where the run's end is POSTed (`docs/callbacks.md`).
    pub callback_url: Option<String>,
    /// The chain of runs this one belongs to (`docs/triggers.md`): given, or inherited from
    /// the run whose event triggered it.
    pub correlation_id: Option<String>,
    /// How many triggers led to this run: 0 for a run a client or a schedule created.
    pub depth: u32,
    /// The run whose event triggered this one.
    pub parent_run_id: Option<String>,
    /// The agent's executor it runs on, by name (`docs/executors.md`); `None`: the default.
    pub executor: Option<String>,
    pub created_at: i64,
}

/// What `run_links` keeps of a run beside its row: the chain it belongs to and the executor
/// it named. Read by `GET /v1/runs/{id}` and by an attempt of an agent with named executors;
/// not by creating, claiming, waiting or listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunLinks {
    pub correlation_id: Option<String>,
    pub depth: u32,
    pub parent_run_id: Option<String>,
    pub executor: Option<String>,
}

impl NewRun {
    /// Whether the run belongs to a chain (`run_links` holds a row for it).
    pub fn is_linked(&self) -> bool {
        self.correlation_id.is_some()
            || self.depth > 0
            || self.parent_run_id.is_some()
            || self.executor.is_some()
    }
}

/// What a client asks for when it creates a run (`POST /v1/runs`; later a schedule's fire or
/// a trigger), before any check. [`NewRun::build`] checks it.
#[derive(Debug, Clone, Default)]
pub struct RunRequest<'a> {
    /// The agent's id or name.
    pub agent: &'a str,
    pub entrypoint: &'a str,
    /// The input object's JSON text; `None` or `null` is `{}`.
    pub input: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    /// The calling API key's id, which scopes `idempotency_key` (`None`: authentication off).
    pub idempotency_scope: Option<&'a str>,
    /// `None`: the entrypoint's configured default, else 0.
    pub priority: Option<i32>,
    pub delay_s: Option<f64>,
    /// RFC 3339.
    pub run_at: Option<&'a str>,
    pub timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    pub backoff: Option<Backoff>,
    pub concurrency_key: Option<&'a str>,
    /// A JSON object's text; `None` or `null` is `{}`.
    pub metadata: Option<&'a str>,
    /// An http(s) URL that gets the run's end (`docs/callbacks.md`).
    pub callback_url: Option<&'a str>,
    /// The chain this run belongs to; runs its events trigger inherit it (`docs/triggers.md`).
    pub correlation_id: Option<&'a str>,
    /// One of the agent's named executors (`docs/executors.md`); `None`: its default.
    pub executor: Option<&'a str>,
}

/// Why a run was refused before anything was stored.
#[derive(Debug, Clone, PartialEq)]
pub enum RunRejection {
    AgentNotFound(String),
    EntrypointNotFound {
        agent: String,
        tag: String,
    },
    InputTooLarge {
        size: usize,
        limit: usize,
    },
    /// One field is out of range or malformed.
    Invalid {
        field: &'static str,
        expected: &'static str,
        message: String,
    },
    /// The input does not match the parameters of entrypoint `tag`.
    Arguments {
        tag: String,
        error: crate::agent::ArgumentsError,
    },
}

fn invalid(
    field: &'static str,
    expected: &'static str,
    message: impl Into<String>,
) -> RunRejection {
    RunRejection::Invalid {
        field,
        expected,
        message: message.into(),
    }
}

/// Longest delay a run may ask for: a year.
const MAX_DELAY_S: f64 = 31_536_000.0;
/// Attempts a run may ask for, the first included.
const MAX_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=100;
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Longest idempotency or concurrency key, in characters.
const MAX_KEY_CHARS: usize = 256;

impl NewRun {
    /// Checks a request against the served agents and the configuration, and builds the run to
    /// store: the agent resolved to its id, the input checked against the entrypoint (with its
    /// safe coercions), the due time, the deadline, attempts and backoff, and the request's
    /// digest for its idempotency key. Nothing is stored unless all of it is valid.
    pub fn build(
        req: &RunRequest<'_>,
        agents: &crate::agent::Agents,
        workers: &crate::settings::WorkersConfig,
        runs: &crate::settings::RunsConfig,
        now: i64,
    ) -> Result<NewRun, RunRejection> {
        let agent = agents
            .get(req.agent)
            .ok_or_else(|| RunRejection::AgentNotFound(req.agent.to_string()))?;
        let Some(entrypoint) = agent.config.entrypoint(req.entrypoint) else {
            return Err(RunRejection::EntrypointNotFound {
                agent: agent.config.agent_name.clone(),
                tag: req.entrypoint.to_string(),
            });
        };
        let input_text = match req.input {
            None | Some("null") => "{}",
            Some(text) => text,
        };
        if input_text.len() > runs.max_input_bytes {
            return Err(RunRejection::InputTooLarge {
                size: input_text.len(),
                limit: runs.max_input_bytes,
            });
        }
        let input = agent
            .conform(req.entrypoint, "[]", input_text)
            .map_err(|error| RunRejection::Arguments {
                tag: req.entrypoint.to_string(),
                error,
            })?
            .kwargs;
        let metadata = match req.metadata {
            None | Some("null") => "{}",
            Some(text) if text.starts_with('{') => text,
            Some(_) => {
                return Err(invalid(
                    "metadata",
                    "object",
                    "`metadata` must be an object",
                ));
            }
        };
        let run_at = match (req.delay_s, req.run_at) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "delay_s",
                    "absent when run_at is given",
                    "give `delay_s` or `run_at`, not both",
                ));
            }
            (Some(d), None) if d.is_finite() && (0.0..=MAX_DELAY_S).contains(&d) => {
                now + (d * 1000.0) as i64
            }
            (Some(_), None) => {
                return Err(invalid(
                    "delay_s",
                    "number of seconds between 0 and 31536000",
                    "`delay_s` is out of range",
                ));
            }
            (None, Some(at)) => chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|e| {
                    invalid(
                        "run_at",
                        "RFC 3339 timestamp",
                        format!("`run_at` is not an RFC 3339 time: {e}"),
                    )
                })?
                .timestamp_millis()
                .max(now),
            (None, None) => now,
        };
        if let Some(t) = req.timeout_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(invalid(
                "timeout_s",
                "positive number",
                "`timeout_s` must be a positive number of seconds",
            ));
        }
        let timeout = workers.call_timeout(req.timeout_s, entrypoint.timeout_s);
        let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !MAX_ATTEMPTS.contains(&max_attempts) {
            return Err(invalid(
                "max_attempts",
                "integer from 1 to 100",
                "`max_attempts` must be from 1 to 100",
            ));
        }
        let backoff = req.backoff.unwrap_or_default();
        backoff
            .validate()
            .map_err(|m| invalid("backoff", "base 1..60, max_s 0..86400, jitter 0..1", m))?;
        for (name, key) in [
            ("idempotency_key", req.idempotency_key),
            ("concurrency_key", req.concurrency_key),
            ("correlation_id", req.correlation_id),
        ] {
            if let Some(k) = key
                && (k.is_empty() || k.chars().count() > MAX_KEY_CHARS)
            {
                return Err(invalid(
                    name,
                    "string of 1 to 256 characters",
                    format!("`{name}` must be 1 to 256 characters"),
                ));
            }
        }
        if let Some(name) = req.executor
            && !agent.has_executor(name)
        {
            return Err(invalid(
                "executor",
                "one of the agent's executors",
                format!(
                    "agent {} has no executor `{name}` (docs/executors.md)",
                    agent.config.agent_name
                ),
            ));
        }
        if let Some(url) = req.callback_url {
            crate::callbacks::check_url(url)
                .map_err(|e| invalid("callback_url", "an http:// URL", e.0))?;
        }
        let request_hash = req
            .idempotency_key
            .map(|_| request_digest(req, &agent.config.agent_id, input_text, metadata));
        Ok(NewRun {
            id: new_run_id(),
            agent: agent.config.agent_id.clone(),
            entrypoint: req.entrypoint.to_string(),
            input,
            idempotency_key: req.idempotency_key.map(str::to_string),
            idempotency_scope: req.idempotency_scope.unwrap_or_default().to_string(),
            request_hash,
            priority: req.priority.or(entrypoint.priority).unwrap_or(0),
            run_at,
            timeout_ms: timeout.as_millis().min(i64::MAX as u128) as i64,
            max_attempts,
            backoff,
            concurrency_key: req.concurrency_key.map(str::to_string),
            metadata: metadata.to_string(),
            callback_url: req.callback_url.map(str::to_string),
            correlation_id: req.correlation_id.map(str::to_string),
            depth: 0,
            parent_run_id: None,
            executor: req.executor.map(str::to_string),
            created_at: now,
        })
    }
}

/// The digest that tells whether a reused idempotency key comes with the same request: every
/// field as the client gave it (the agent as its id, so its name and id are the same request).
fn request_digest(req: &RunRequest<'_>, agent_id: &str, input: &str, metadata: &str) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::json!([
        agent_id,
        req.entrypoint,
        input,
        req.idempotency_key,
        req.priority,
        req.delay_s,
        req.run_at,
        req.timeout_s,
        req.max_attempts,
        req.backoff.map(|b| [b.base, b.max_s, b.jitter]),
        req.concurrency_key,
        metadata,
    ]);
    // Appended only when given, so digests of requests without them stay what they were.
    let mut canonical = canonical;
    if let serde_json::Value::Array(fields) = &mut canonical {
        if let Some(url) = req.callback_url {
            fields.push(url.into());
        }
        if let Some(correlation) = req.correlation_id {
            fields.push(serde_json::json!({ "correlation_id": correlation }));
        }
        if let Some(executor) = req.executor {
            fields.push(serde_json::json!({ "executor": executor }));
        }
    }
    Sha256::digest(canonical.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stored run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Storage order; the list cursor.
    pub seq: i64,
    pub id: String,
    pub agent: String,
    pub entrypoint: String,
    pub input: String,
    pub status: RunStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    /// Attempts that ended because their node lost the lease (crash, restart), not by the agent.
    pub lease_losses: u32,
    pub priority: i32,
    pub run_at: i64,
    pub timeout_ms: i64,
    pub backoff: Backoff,
    pub concurrency_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub metadata: String,
    /// JSON text of the result, once succeeded.
    pub result: Option<String>,
    /// JSON text `{code, message, type?, traceback?}` of the last failure.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

impl Run {
    /// Whether another attempt may follow a retriable failure of the current one. Attempts lost
    /// with their node's lease do not count against `max_attempts`.
    pub fn may_retry(&self) -> bool {
        self.attempt < self.max_attempts.saturating_add(self.lease_losses)
    }
}

/// One entry of a run's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    pub run_id: String,
    /// 1, 2, 3, … per run, without gaps.
    pub seq: i64,
    pub kind: EventKind,
    /// JSON text.
    pub data: String,
    pub at: i64,
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub data: String,
}

impl NewEvent {
    pub fn new(kind: impl Into<EventKind>, data: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            data: data.into(),
        }
    }
}

/// The proof that a node holds a run: the claim's owner and attempt. Every write of a running
/// run carries it, and the store refuses it once the run was requeued or finished elsewhere
/// (fencing), so a stale node can never complete a run twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    pub run_id: String,
    pub owner: String,
    pub attempt: u32,
}

/// A run handed to this node by a claim.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run: Run,
    /// The last checkpoint's state (JSON text), which the new attempt resumes from.
    pub checkpoint: Option<String>,
}

/// When and where an attempt's code started: its `run.started` event and `started_at`. Written
/// once the executor has handed the call to a worker, never at the claim, because waiting for a
/// worker is not running.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    pub at: i64,
    pub node: String,
}

/// Lease a new run to its creating node in the same commit, when nothing is queued ahead of it:
/// the idle path then costs one commit instead of two, and starts without a dispatcher round.
#[derive(Debug, Clone)]
pub struct DirectClaim {
    pub node: String,
    pub owner: String,
    pub lease_until: i64,
}

/// What to claim: due runs by priority then age, at most `limit` per agent.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub node: String,
    pub owner: String,
    pub now: i64,
    pub lease_until: i64,
    /// (agent, how many more runs it may start now).
    pub per_agent: Vec<(String, usize)>,
    /// Caps over every node sharing the store, checked by the store in the claim.
    pub cluster: ClusterCaps,
    /// Per-entrypoint caps of the agents claimed for, over every node sharing the store.
    pub entrypoint_caps: Vec<EntrypointCap>,
}

/// At most `max` runs of one entrypoint leased at once, counted by the store in the claim (on
/// PostgreSQL under the cluster caps' lock, so two nodes never pass it between them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrypointCap {
    pub agent: String,
    pub entrypoint: String,
    pub max: usize,
}

/// How many more runs of each capped entrypoint of one agent a claim may lease, from the runs
/// leased now; both stores count with it.
#[derive(Debug, Default)]
pub struct EntrypointRoom {
    left: Vec<(String, usize)>,
    /// A candidate was left queued by its entrypoint's cap.
    trimmed: bool,
}

impl EntrypointRoom {
    pub fn add(&mut self, cap: &EntrypointCap, running: usize) {
        self.left
            .push((cap.entrypoint.clone(), cap.max.saturating_sub(running)));
    }

    /// The entrypoints with no room left, whose runs are not candidates at all.
    pub fn full(&self) -> Vec<String> {
        self.left
            .iter()
            .filter(|(_, n)| *n == 0)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// [`Self::full`] as a JSON array's text (SQLite reads it with `json_each`).
    pub fn full_json(&self) -> String {
        serde_json::Value::from(self.full()).to_string()
    }

    /// Whether a candidate of `entrypoint` may be leased; counts it if so.
    pub fn take(&mut self, entrypoint: &str) -> bool {
        match self.left.iter_mut().find(|(e, _)| e == entrypoint) {
            None => true,
            Some((_, 0)) => {
                self.trimmed = true;
                false
            }
            Some((_, n)) => {
                *n -= 1;
                true
            }
        }
    }

    /// Whether a cap may be holding runs back: the dispatcher looks again soon, since room a
    /// run frees on another node is not announced.
    pub fn held_back(&self) -> bool {
        self.trimmed || self.left.iter().any(|(_, n)| *n == 0)
    }
}

impl ClaimRequest {
    /// The caps of `agent`'s entrypoints.
    pub fn caps_of<'a>(&'a self, agent: &'a str) -> impl Iterator<Item = &'a EntrypointCap> {
        self.entrypoint_caps
            .iter()
            .filter(move |c| c.agent == agent)
    }
}

/// Caps on the runs leased at once across all the nodes of a shared store (PostgreSQL), on top
/// of each node's own. Exact: the store counts the runs leased (on every node) and claims under
/// one lock, so two nodes claiming together never pass a cap between them. Every node enforces
/// the caps it is configured with; configure them alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterCaps {
    /// Runs leased at once, all agents together.
    pub total: Option<usize>,
    /// Runs of one agent leased at once.
    pub per_agent: Option<usize>,
}

impl ClusterCaps {
    pub fn is_set(&self) -> bool {
        self.total.is_some() || self.per_agent.is_some()
    }
}

/// The outcome of a claim.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    pub runs: Vec<ClaimedRun>,
    /// When the earliest queued run that is not due yet becomes due.
    pub next_due: Option<i64>,
    /// A cluster-wide cap let this claim take fewer runs than asked: room may free up on
    /// another node, which tells nobody, so look again soon.
    pub held_back: bool,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded {
        result: String,
    },
    /// A terminal failure (non-retriable, or out of attempts).
    Failed {
        error: String,
    },
    TimedOut {
        error: String,
    },
    Cancelled {
        error: String,
    },
    /// A retriable failure: back to `queued` until `run_at`, `delay_ms` (the backoff) from now.
    Retry {
        error: String,
        run_at: i64,
        delay_ms: i64,
    },
}

impl Outcome {
    pub fn status(&self) -> RunStatus {
        match self {
            Self::Succeeded { .. } => RunStatus::Succeeded,
            Self::Failed { .. } => RunStatus::Failed,
            Self::TimedOut { .. } => RunStatus::TimedOut,
            Self::Cancelled { .. } => RunStatus::Cancelled,
            Self::Retry { .. } => RunStatus::Queued,
        }
    }
}

/// A write of a running run, refused because its lease is no longer this node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseLost;

/// The outcome of finishing an attempt.
#[derive(Debug, Clone)]
pub struct Finished {
    pub run: Run,
    pub events: Vec<RunEvent>,
}

/// The outcome of a cancel request.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// It was queued: now `cancelled`.
    Cancelled(Finished),
    /// It is running: the node running it was asked to stop it.
    Requested {
        run: Run,
        event: Option<RunEvent>,
    },
    /// It had already ended; nothing changed.
    AlreadyFinished(Run),
    NotFound,
}

/// The outcome of creating a run.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// Stored; `claimed` when it was also leased to the creating node at once.
    Created {
        run: Run,
        event: RunEvent,
        claimed: Option<ClaimedRun>,
    },
    /// The idempotency key was used before with the same request: that run.
    Existing(Run),
    /// The idempotency key was used before with another request.
    Conflict { existing_id: String },
}

/// A lease renewal's verdict on one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    pub run_id: String,
    /// The attempt whose lease this is.
    pub attempt: u32,
    /// The lease is still this node's.
    pub held: bool,
    /// Someone asked to cancel the run (possibly through another node).
    pub cancel_requested: bool,
}

/// Filters and paging of the run list. Newest first.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub agent: Option<String>,
    pub entrypoint: Option<String>,
    pub status: Option<RunStatus>,
    pub concurrency_key: Option<String>,
    /// Only runs stored before this `seq` (the previous page's cursor).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(1, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(8));
        assert_eq!(b.delay(20, 0.5), Duration::from_secs(300));
        let j = Backoff::default();
        assert!(j.delay(2, 0.999) < Duration::from_millis(4400));
        assert!(j.delay(2, 0.999) > Duration::from_millis(4300));
        assert!(Backoff { base: 0.5, ..j }.validate().is_err());
    }

    #[test]
    fn statuses_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
        }
        assert!(RunStatus::TimedOut.is_terminal());
        assert!(!RunStatus::Running.is_terminal());
    }

    #[test]
    fn lost_leases_do_not_use_up_attempts() {
        let mut r = Run {
            seq: 1,
            id: "r".into(),
            agent: "a".into(),
            entrypoint: "e".into(),
            input: "{}".into(),
            status: RunStatus::Running,
            attempt: 3,
            max_attempts: 3,
            lease_losses: 0,
            priority: 0,
            run_at: 0,
            timeout_ms: 1,
            backoff: Backoff::default(),
            concurrency_key: None,
            idempotency_key: None,
            metadata: "{}".into(),
            result: None,
            error: None,
            cancel_requested: false,
            lease_owner: None,
            lease_expires_at: None,
            created_at: 0,
            started_at: None,
            finished_at: None,
            updated_at: 0,
        };
        assert!(!r.may_retry());
        r.lease_losses = 1;
        assert!(r.may_retry());
    }
}

impl std::fmt::Display for RunRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AgentNotFound(key) => write!(f, "no agent `{key}` is served"),
            Self::EntrypointNotFound { agent, tag } => {
                write!(f, "agent `{agent}` has no entrypoint `{tag}`")
            }
            Self::InputTooLarge { size, limit } => {
                write!(
                    f,
                    "the input is {size} bytes, more than the limit of {limit}"
                )
            }
            Self::Invalid { message, .. } => f.write_str(message),
            Self::Arguments { tag, error } => match error {
                crate::agent::ArgumentsError::Schema(violations) => {
                    write!(f, "the input does not match entrypoint `{tag}`: ")?;
                    let parts: Vec<String> = violations
                        .iter()
                        .map(|v| format!("{}: {}", v.path, v.message))
                        .collect();
                    f.write_str(&parts.join("; "))
                }
                _ => write!(f, "the input of entrypoint `{tag}` is not an object"),
            },
        }
    }
}
