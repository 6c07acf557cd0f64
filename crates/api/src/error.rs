//! The native API's errors: one envelope, `{"error": {"code", "message", "details",
//! "request_id"}}`, and the one place where an error code becomes an HTTP status.

use agentry_core::ErrorCode;
use agentry_runner::CallError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered by a native route.
#[derive(Debug)]
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

    /// The envelope as a JSON value (also sent inside SSE and WebSocket error events).
    pub fn body(&self) -> Value {
        json!({"error": {
            "code": self.code.as_str(),
            "message": self.message,
            "details": self.details,
            "request_id": uuid::Uuid::new_v4().to_string(),
        }})
    }
}

/// The HTTP status of each error code. `docs/errors.md` mirrors this table.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::ValidationError => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::AgentNotFound | ErrorCode::EntrypointNotFound => StatusCode::NOT_FOUND,
        ErrorCode::WrongEntrypointKind => StatusCode::BAD_REQUEST,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
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
    fn into_response(self) -> Response {
        (status_of(self.code), axum::Json(self.body())).into_response()
    }
}
