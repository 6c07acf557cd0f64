//! Where an agent's code runs, behind one trait: [`AgentExecutor`]. The API and the engine
//! know only this; the warm local Python pool (`agentry-runner`) is the first implementation,
//! and sandboxed pools, a remote HTTP executor and remote workers will be others.
//!
//! The values that cross it are here too: what an entrypoint is ([`EntrypointReport`]), what a
//! call produces ([`Payload`]: its JSON text, passed through without re-parsing), how a call
//! fails ([`CallError`], mapped onto the error taxonomy), and what a durable run's call sends
//! ([`RunItem`]). Streams are polled (`poll_next`), so that following one allocates nothing per
//! chunk.

use std::future::poll_fn;
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

use crate::ErrorCode;

/// RunAgent's value types (`CoreSerializer._determine_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array,
    Object,
}

impl ValueType {
    /// The name RunAgent puts in `{"type": …}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Boolean => "boolean",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::String => "string",
            Self::Array => "array",
            Self::Object => "object",
        }
    }

    /// The type RunAgent names `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Null,
            Self::Boolean,
            Self::Integer,
            Self::Number,
            Self::String,
            Self::Array,
            Self::Object,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
    }

    /// The type RunAgent gives a decoded JSON value.
    pub fn of(value: &serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => Self::Null,
            Value::Bool(_) => Self::Boolean,
            Value::Number(n) if n.is_f64() => Self::Number,
            Value::Number(_) => Self::Integer,
            Value::String(_) => Self::String,
            Value::Array(_) => Self::Array,
            Value::Object(_) => Self::Object,
        }
    }
}

/// A value produced by an agent: its RunAgent type and its JSON text as Python's `json.dumps`
/// wrote it (`", "` and `": "` separators, `ensure_ascii=False`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub ty: ValueType,
    pub json: Bytes,
}

impl Payload {
    /// The JSON text. Executors check that it is UTF-8 before they hand a payload out.
    pub fn as_str(&self) -> &str {
        // Checked by the executor; a failure here would be a bug, and "" is harmless.
        std::str::from_utf8(&self.json).unwrap_or_default()
    }
}

/// What an entrypoint is, as its executor found it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EntrypointReport {
    pub tag: String,
    /// `function`, `coroutine`, `generator` or `asyncgen`.
    pub kind: String,
    pub stream: bool,
    /// JSON Schema of the keyword arguments.
    pub schema: serde_json::Value,
    pub doc: Option<String>,
    /// The parameters positional arguments fill, in order (keyword-only ones excluded). The
    /// name is the worker protocol's.
    #[serde(default)]
    pub positional_only: Vec<String>,
    #[serde(default)]
    pub var_args: bool,
    #[serde(default)]
    pub var_kwargs: bool,
    /// The parameter that receives the run context (`ctx`), if the entrypoint takes one.
    #[serde(default)]
    pub context: Option<String>,
}

impl EntrypointReport {
    /// Async entrypoints may share a worker; everything else needs the worker to itself.
    pub fn is_async(&self) -> bool {
        self.kind == "coroutine" || self.kind == "asyncgen"
    }
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CallError {
    /// The agent's code raised.
    #[error("{exc_type}: {message}")]
    Agent {
        exc_type: String,
        message: String,
        traceback: String,
        /// False when the agent raised a non-retriable error: a durable run fails at once.
        retriable: bool,
    },
    /// The worker died while running the call.
    #[error("the agent's worker crashed: {0}")]
    Crashed(String),
    /// The call ran past its deadline.
    #[error("the call did not finish within {0:?}; its worker was stopped")]
    Timeout(Duration),
    /// The call was cancelled.
    #[error("the call was cancelled")]
    Cancelled,
    /// No worker can take calls for this agent.
    #[error("{0}")]
    Unavailable(String),
    /// The agent has no such entrypoint.
    #[error("entrypoint {0} not found")]
    NoSuchEntrypoint(String),
}

impl CallError {
    /// The taxonomy code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Agent { .. } => ErrorCode::AgentError,
            Self::Crashed(_) => ErrorCode::AgentCrashed,
            Self::Timeout(_) => ErrorCode::TimeoutError,
            Self::Cancelled => ErrorCode::Cancelled,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::NoSuchEntrypoint(_) => ErrorCode::EntrypointNotFound,
        }
    }

    /// The text RunAgent puts after "Server error running agent {id}: ", i.e. `str(exc)`.
    pub fn runagent_text(&self) -> String {
        match self {
            Self::Agent { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// What a durable run's call sends, in order: chunks and context messages, then exactly one
/// `Result`, `End` or `Failed`.
#[derive(Debug)]
pub enum RunItem {
    Chunk(Payload),
    /// `ctx.emit(kind, data)`; `data` is JSON text.
    Event {
        kind: String,
        data: Bytes,
    },
    /// `ctx.log(message, level)`.
    Log {
        level: String,
        message: String,
    },
    /// `ctx.checkpoint(state)`: the agent waits for [`RunCall::ack`] before it goes on.
    Checkpoint(Bytes),
    Result(Payload),
    End(u32),
    Failed(CallError),
}

/// The interpreter (or whatever runs the agent's code) and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// What the workers execute.
    pub executable: PathBuf,
    /// `3.11.7`.
    pub version: String,
    /// A sentence saying why this one was chosen.
    pub reason: String,
}

/// How an executor is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Workers ready to take calls right now.
    pub live_workers: usize,
    /// Set while the agent's workers keep dying young: why.
    pub crash_loop: Option<String>,
}

/// The chunks of a streaming call. Dropping it before the end cancels the call.
pub trait ChunkStream: Send {
    /// The next chunk; `Ready(None)` once the stream ended normally.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Payload, CallError>>>;
    /// How many chunks the agent reported, once the stream has ended.
    fn total(&self) -> Option<u32>;
}

impl dyn ChunkStream + '_ {
    /// The next chunk; `None` once the stream ended normally.
    pub async fn next(&mut self) -> Option<Result<Payload, CallError>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// The call of a durable run in progress. Dropping it before its terminal item cancels it.
pub trait RunCall: Send {
    /// The next item; after a terminal one, `Ready(None)`. Past the deadline the call is
    /// stopped and the item is `Failed(Timeout)`.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<RunItem>>;
    /// Lets the agent go on after a checkpoint, telling it whether the checkpoint was saved.
    fn ack(&self, saved: bool);
    /// Asks the agent to stop (`ctx.cancelled` turns true; an async call is cancelled).
    fn cancel(&self);
    /// Stops the call now, whatever it is doing.
    fn kill(&mut self, reason: &str);
}

impl dyn RunCall + '_ {
    /// The next item; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<RunItem> {
        poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// Runs one agent's entrypoints. Every call has a deadline; an executor enforces it and
/// answers `CallError::Timeout` past it.
#[async_trait]
pub trait AgentExecutor: Send + Sync + 'static {
    /// What the executor found about the entrypoint with this tag (kind, schema, docs);
    /// `None` when it does not know it.
    fn entrypoint(&self, tag: &str) -> Option<&EntrypointReport>;

    /// Runs a unary call: `args` and `kwargs` are the JSON texts of a list and an object.
    async fn call(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Payload, CallError>;

    /// Starts a streaming call.
    async fn stream(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Box<dyn ChunkStream>, CallError>;

    /// Starts the call of a durable run: `kwargs` is the input object's JSON text and
    /// `context` the run context's (`{"id", "attempt", "state"}`). The deadline starts once
    /// the code starts.
    async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<Box<dyn RunCall>, CallError>;

    fn health(&self) -> Health;

    /// How many durable runs this executor can start soon: the engine leases at most this many
    /// of its agent's runs at once (unless configured), so that a leased run does not wait long
    /// for a worker and the rest stay queued for whichever node has room.
    fn run_capacity(&self) -> usize;

    /// Stops taking calls, lets those in flight finish within `grace`, then stops.
    async fn drain(&self, grace: Duration);
}
