//! The kinds of a run's events: one enum for the runtime's own (`run.*`) and the agent's
//! (`ctx.emit`), so that no layer spells them as string literals. The string forms are part of
//! the public API (SSE `event:` names, the log's `type`): never rename one.

use std::fmt;

/// What an event of a run's log records.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Stored, waiting to be claimed.
    Queued,
    /// An attempt's code started (a claim leased it).
    Started,
    /// The attempt is alive (at most every `runs.heartbeat_event_s`).
    Heartbeat,
    /// A stream chunk: `{"index", "value"}`.
    Chunk,
    /// A checkpoint was saved.
    Checkpoint,
    /// `ctx.log(...)`.
    Log,
    /// The attempt failed and the run goes back to the queue.
    Retrying,
    /// Someone asked to cancel the running run.
    CancelRequested,
    /// This node stopped an attempt itself because it could not renew the attempt's lease in
    /// time (`{"attempt", "reason"}`); the run is requeued when the lease expires.
    Fenced,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// An event the agent emitted (`ctx.emit(kind, data)`), under the name it chose.
    Custom(String),
}

impl EventKind {
    /// The runtime's own kinds.
    pub const RUNTIME: [EventKind; 13] = [
        Self::Queued,
        Self::Started,
        Self::Heartbeat,
        Self::Chunk,
        Self::Checkpoint,
        Self::Log,
        Self::Retrying,
        Self::CancelRequested,
        Self::Fenced,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            Self::Queued => "run.queued",
            Self::Started => "run.started",
            Self::Heartbeat => "run.heartbeat",
            Self::Chunk => "run.chunk",
            Self::Checkpoint => "run.checkpoint",
            Self::Log => "run.log",
            Self::Retrying => "run.retrying",
            Self::CancelRequested => "run.cancel_requested",
            Self::Fenced => "run.fenced",
            Self::Succeeded => "run.succeeded",
            Self::Failed => "run.failed",
            Self::TimedOut => "run.timed_out",
            Self::Cancelled => "run.cancelled",
            Self::Custom(kind) => kind,
        }
    }

    /// The kind a stored name stands for.
    pub fn parse(name: &str) -> Self {
        Self::RUNTIME
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap_or_else(|| Self::Custom(name.to_string()))
    }

    /// The run's last event: it ended in a terminal state.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for EventKind {
    fn from(name: &str) -> Self {
        Self::parse(name)
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::EventKind;

    #[test]
    fn names_round_trip_and_only_endings_are_terminal() {
        for kind in EventKind::RUNTIME {
            assert_eq!(EventKind::parse(kind.as_str()), kind);
        }
        assert_eq!(
            EventKind::parse("progress"),
            EventKind::Custom("progress".into())
        );
        let terminal: Vec<&str> = EventKind::RUNTIME
            .iter()
            .filter(|k| k.is_terminal())
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            terminal,
            [
                "run.succeeded",
                "run.failed",
                "run.timed_out",
                "run.cancelled"
            ]
        );
    }
}
