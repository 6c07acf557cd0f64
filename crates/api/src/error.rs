//! The native API's errors: one envelope, `{"error": {"code", "message", "details",
//! "request_id"}}`, and the one place where an error code becomes an HTTP status.

use agentry_core::ErrorCode;
use agentry_core::executor::CallError;
use agentry_core::schema::SchemaViolation;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered by a native route. As a response it is rendered by the request-id
/// middleware (`request_id.rs`), which knows the request's id.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// A runner failure, with the Python traceback only when the server is told to expose it.
    pub fn from_call(err: CallError, expose_tracebacks: bool) -> Self {
        let code = err.code();
        match err {
            CallError::Agent {
                exc_type,
                message,
                traceback,
                ..
            } => {
                let mut details = json!({"exception_type": exc_type});
                if expose_tracebacks {
                    details["traceback"] = Value::String(traceback);
                }
                Self::new(code, format!("{exc_type}: {message}")).with_details(details)
            }
            other => Self::new(code, other.to_string()),
        }
    }

    /// A run-store failure: what a client may retry is 503, anything else 500 (logged here).
    pub fn from_store(err: agentry_core::StoreError) -> Self {
        match err {
            agentry_core::StoreError::Unavailable(why) => Self::new(
                ErrorCode::Unavailable,
                format!(
                    "the run store cannot take this now: {why}; nothing was stored, retry later"
                ),
            ),
            other => {
                tracing::error!("run store failure: {other}");
                Self::new(
                    ErrorCode::ServerError,
                    "the run store failed; see the server log",
                )
            }
        }
    }

    /// The envelope as a JSON value (also sent inside SSE and WebSocket error events), with
    /// the id of the request it answers.
    pub fn body(&self, request_id: &str) -> Value {
        json!({"error": {
            "code": self.code.as_str(),
            "message": self.message,
            "details": self.details,
            "request_id": request_id,
        }})
    }
}

/// The 422 for input that does not match an entrypoint's parameters: each violation's path,
/// kind and expected type in `details.errors`.
pub fn schema_violations(tag: &str, violations: &[SchemaViolation]) -> ApiError {
    let first = violations.first().map_or("", |v| v.message.as_str());
    let errors: Vec<Value> = violations
        .iter()
        .map(|v| json!({"path": v.path, "kind": v.kind.as_str(), "expected": v.expected, "message": v.message}))
        .collect();
    ApiError::new(
        ErrorCode::ValidationError,
        format!("the input does not match entrypoint `{tag}`: {first}"),
    )
    .with_details(json!({"errors": errors}))
}

/// A call's arguments that do not fit the entrypoint: 422.
pub fn arguments_rejected(tag: &str, err: agentry_core::agent::ArgumentsError) -> ApiError {
    use agentry_core::agent::ArgumentsError;
    match err {
        ArgumentsError::NotAnObject => invalid(
            "input",
            "object",
            "`input` must be an object of keyword arguments",
        ),
        ArgumentsError::NotAList => invalid(
            "args",
            "array",
            "`args` must be a list of positional arguments",
        ),
        ArgumentsError::Schema(violations) => schema_violations(tag, &violations),
    }
}

/// A run refused before anything was stored.
pub fn run_rejected(rejection: agentry_core::runs::RunRejection) -> ApiError {
    use agentry_core::runs::RunRejection;
    match rejection {
        RunRejection::AgentNotFound(key) => agent_not_found(&key),
        RunRejection::EntrypointNotFound { agent, tag } => entrypoint_not_found(&agent, &tag),
        RunRejection::InputTooLarge { size, limit } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the run's input is {size} bytes, more than the limit of {limit} (--max-run-input-bytes)"
            ),
        ),
        RunRejection::Invalid {
            field,
            expected,
            message,
        } => invalid(field, expected, message),
        RunRejection::Arguments { tag, error } => arguments_rejected(&tag, error),
    }
}

/// No agent with that id or name.
pub fn agent_not_found(key: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AgentNotFound,
        format!("no agent with id or name `{key}` is served here"),
    )
}

/// The agent has no entrypoint with that tag.
pub fn entrypoint_not_found(agent_name: &str, tag: &str) -> ApiError {
    ApiError::new(
        ErrorCode::EntrypointNotFound,
        format!("agent `{agent_name}` has no entrypoint `{tag}`"),
    )
}

/// A `validation_error` naming one field and what it should have been.
pub fn invalid(path: &str, expected: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationError, message)
        .with_details(json!({"errors": [{"path": path, "expected": expected}]}))
}

/// A WebSocket route called without a WebSocket handshake.
pub fn upgrade_required(
    rejection: axum::extract::ws::rejection::WebSocketUpgradeRejection,
) -> ApiError {
    ApiError::new(
        ErrorCode::UpgradeRequired,
        format!(
            "this route speaks WebSocket only: {}",
            rejection.body_text()
        ),
    )
}

/// The close code for a WebSocket read that failed: 1009 (message too big) when the client sent
/// more than the limit, 1002 (protocol error) otherwise. axum does not expose tungstenite's
/// error type, so the capacity error is known by its text.
pub fn ws_read_close_code(err: &axum::Error) -> u16 {
    let text = err.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        1009
    } else {
        1002
    }
}

/// The HTTP status of each error code. `docs/errors.md` mirrors this table.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::AuthenticationError => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionError => StatusCode::FORBIDDEN,
        ErrorCode::RateLimitError => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ValidationError => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::AgentNotFound
        | ErrorCode::EntrypointNotFound
        | ErrorCode::RunNotFound
        | ErrorCode::KeyNotFound
        | ErrorCode::ScheduleNotFound
        | ErrorCode::HookNotFound => StatusCode::NOT_FOUND,
        ErrorCode::IdempotencyConflict | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::WrongEntrypointKind => StatusCode::BAD_REQUEST,
        ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::AgentError | ErrorCode::ConfigurationError | ErrorCode::ServerError => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        ErrorCode::AgentCrashed => StatusCode::BAD_GATEWAY,
        ErrorCode::TimeoutError => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // nginx's "client closed request": only ever logged, the client is gone.
        ErrorCode::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
    }
}

impl IntoResponse for ApiError {
    /// The status now; the body once the request-id middleware adds the request's id.
    fn into_response(self) -> Response {
        let mut resp = status_of(self.code).into_response();
        resp.extensions_mut().insert(self);
        resp
    }
}
