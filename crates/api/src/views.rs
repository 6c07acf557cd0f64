//! The shapes the API answers with that are not a handler's own view: the error envelope,
//! the probes' bodies, SSE events, enumerations, and how stored times are shown. Each is also
//! its OpenAPI schema.

use std::collections::BTreeMap;

use agentry_core::ErrorCode;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

/// A stored time (Unix milliseconds) as the API shows it: RFC 3339, milliseconds, UTC.
pub fn time(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(rfc3339)
        .map(serde_json::Value::String)
        .unwrap_or(serde_json::Value::Null)
}

/// A stored time (Unix milliseconds) as RFC 3339 text, or `None` if out of range.
pub fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// The error envelope of every native route.
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)]
pub struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct ErrorBody {
    /// Stable: never renamed.
    #[schema(schema_with = error_code_schema)]
    code: String,
    /// For people.
    message: String,
    /// Depends on the code (`errors` for validation, `retry_after_s` for rate limits, ...).
    details: Value,
    request_id: String,
}

fn error_code_schema() -> impl Into<RefOr<Schema>> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct InvokeResponse {
    /// The entrypoint's return value, as JSON.
    output: Value,
}

#[derive(ToSchema)]
#[schema(as = RunStatus)]
#[allow(dead_code)]
#[allow(non_camel_case_types)]
pub enum RunStatusView {
    queued,
    running,
    succeeded,
    failed,
    timed_out,
    cancelled,
}

#[derive(ToSchema)]
#[schema(as = Backoff)]
#[allow(dead_code)]
pub struct BackoffView {
    /// The delay before attempt n+1 is `min(base^n, max_s)` seconds (default 2).
    #[schema(required = false, minimum = 1.0, maximum = 60.0)]
    base: f64,
    /// Default 300.
    #[schema(required = false, minimum = 0.0, maximum = 86400.0)]
    max_s: f64,
    /// Fraction of the delay added at random (default 0.1).
    #[schema(required = false, minimum = 0.0, maximum = 1.0)]
    jitter: f64,
}

/// One Server-Sent Event, as a client's parser reads it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// The event's type: `chunk`, `done`, `error`; for runs, the run event's type.
    event: String,
    /// The chunk's index, or the run event's sequence number (absent on `done` and `error`).
    id: Option<String>,
    /// JSON text: the chunk, the error envelope, or the run event.
    data: String,
}

#[derive(ToSchema)]
#[schema(as = RunError)]
#[allow(dead_code)]
pub struct RunErrorView {
    code: String,
    message: String,
    /// The Python exception class.
    r#type: Option<String>,
    /// Admin keys only (or `--expose-tracebacks`).
    traceback: Option<String>,
}

#[derive(ToSchema)]
#[schema(as = Scope)]
#[allow(dead_code)]
pub enum ScopeView {
    #[schema(rename = "invoke")]
    Invoke,
    #[schema(rename = "runs:read")]
    RunsRead,
    #[schema(rename = "runs:write")]
    RunsWrite,
    #[schema(rename = "schedules")]
    Schedules,
    #[schema(rename = "admin")]
    Admin,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    status: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    /// `ready`, `not_ready` or `draining`.
    status: String,
    /// Per agent (by name): `live_workers`, `crash_loop`. Only for a caller with a valid key,
    /// or while authentication is off on loopback.
    agents: Option<BTreeMap<String, Value>>,
    /// `ok`, or `unreachable` while the run store's database does not answer (then the node is
    /// not ready). Shown with `agents`.
    store: Option<String>,
}
