//! How a call to an agent can fail, as the runner sees it. The API layer maps these onto the
//! error taxonomy (`agentry_core::ErrorCode`) and onto RunAgent's envelopes.

use std::time::Duration;

use agentry_core::ErrorCode;

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
