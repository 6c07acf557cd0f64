//! The error taxonomy: one stable, machine-readable code per kind of failure. The API crate maps
//! each code to an HTTP status in one place; `docs/errors.md` lists them all.

use serde::Serialize;

/// A stable error code. The string form (`as_str`) is part of the public API: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No valid API key was presented (missing, unknown, revoked or expired).
    AuthenticationError,
    /// The key is valid but lacks the scope, or is limited to other agents.
    PermissionError,
    /// Too many requests for the caller's or the agent's rate limit.
    RateLimitError,
    /// The request body or parameters are malformed or do not match the entrypoint's schema.
    ValidationError,
    /// No agent with that id or name is served here.
    AgentNotFound,
    /// The agent has no entrypoint with that tag.
    EntrypointNotFound,
    /// No run with that id (never created, or deleted by retention).
    RunNotFound,
    /// No API key with that id.
    KeyNotFound,
    /// No schedule with that id (never created, or deleted).
    ScheduleNotFound,
    /// No webhook with that name is declared.
    HookNotFound,
    /// The request conflicts with what is stored: a schedule's name is taken, or the schedule
    /// changed while the request was applied (retry it).
    Conflict,
    /// The idempotency key was already used with a different request.
    IdempotencyConflict,
    /// A streaming entrypoint was called on a non-streaming route, or the reverse.
    WrongEntrypointKind,
    /// A WebSocket route was called without a WebSocket handshake.
    UpgradeRequired,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// With authentication off, a body sent as something other than JSON (what a web page can
    /// send cross-site).
    UnsupportedMediaType,
    /// The agent's code raised an exception.
    AgentError,
    /// The worker process running the call died (crash, `os._exit`, OOM kill, signal).
    AgentCrashed,
    /// The call ran past its deadline; its worker was killed and replaced.
    TimeoutError,
    /// The call was cancelled (client went away or asked).
    Cancelled,
    /// No worker could take the call (the agent's workers are all down, or the server is
    /// shutting down), or the run store cannot write (locked database, full disk).
    Unavailable,
    /// The agent's configuration is invalid.
    ConfigurationError,
    /// An unexpected failure inside the server.
    ServerError,
}

impl ErrorCode {
    /// Every code, in documentation order.
    pub const ALL: [ErrorCode; 23] = [
        Self::AuthenticationError,
        Self::PermissionError,
        Self::RateLimitError,
        Self::ValidationError,
        Self::AgentNotFound,
        Self::EntrypointNotFound,
        Self::RunNotFound,
        Self::KeyNotFound,
        Self::ScheduleNotFound,
        Self::HookNotFound,
        Self::Conflict,
        Self::IdempotencyConflict,
        Self::WrongEntrypointKind,
        Self::UpgradeRequired,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::AgentError,
        Self::AgentCrashed,
        Self::TimeoutError,
        Self::Cancelled,
        Self::Unavailable,
        Self::ConfigurationError,
        Self::ServerError,
    ];

    /// The code as it appears in error envelopes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthenticationError => "authentication_error",
            Self::PermissionError => "permission_error",
            Self::RateLimitError => "rate_limit_error",
            Self::ValidationError => "validation_error",
            Self::AgentNotFound => "agent_not_found",
            Self::EntrypointNotFound => "entrypoint_not_found",
            Self::RunNotFound => "run_not_found",
            Self::KeyNotFound => "key_not_found",
            Self::ScheduleNotFound => "schedule_not_found",
            Self::HookNotFound => "hook_not_found",
            Self::Conflict => "conflict",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::WrongEntrypointKind => "wrong_entrypoint_kind",
            Self::UpgradeRequired => "upgrade_required",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::AgentError => "agent_error",
            Self::AgentCrashed => "agent_crashed",
            Self::TimeoutError => "timeout_error",
            Self::Cancelled => "cancelled",
            Self::Unavailable => "unavailable",
            Self::ConfigurationError => "configuration_error",
            Self::ServerError => "server_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn all_lists_each_code_once() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        // A new variant must be added to ALL: this match stops compiling until it is handled.
        for code in ErrorCode::ALL {
            match code {
                ErrorCode::AuthenticationError
                | ErrorCode::PermissionError
                | ErrorCode::RateLimitError
                | ErrorCode::ValidationError
                | ErrorCode::AgentNotFound
                | ErrorCode::EntrypointNotFound
                | ErrorCode::RunNotFound
                | ErrorCode::KeyNotFound
                | ErrorCode::ScheduleNotFound
                | ErrorCode::HookNotFound
                | ErrorCode::Conflict
                | ErrorCode::IdempotencyConflict
                | ErrorCode::WrongEntrypointKind
                | ErrorCode::UpgradeRequired
                | ErrorCode::PayloadTooLarge
                | ErrorCode::UnsupportedMediaType
                | ErrorCode::AgentError
                | ErrorCode::AgentCrashed
                | ErrorCode::TimeoutError
                | ErrorCode::Cancelled
                | ErrorCode::Unavailable
                | ErrorCode::ConfigurationError
                | ErrorCode::ServerError => {}
            }
        }
    }
}
