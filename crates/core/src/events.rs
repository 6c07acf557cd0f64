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

/// A place in the global event log (`GET /v1/events`): after which event to go on. Its text
/// form is the SSE id (`Last-Event-ID`): `<gseq>` on SQLite, `<tx>.<gseq>` on PostgreSQL,
/// where events are ordered by the transaction that wrote them, then by insertion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventCursor {
    /// The writing transaction's id (PostgreSQL; 0 on SQLite).
    pub tx: u64,
    pub gseq: i64,
}

impl EventCursor {
    /// Parses a cursor's text form; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (tx, gseq) = match text.split_once('.') {
            Some((tx, gseq)) => (tx.parse().ok()?, gseq.parse().ok()?),
            None => (0, text.parse().ok()?),
        };
        (gseq >= 0).then_some(Self { tx, gseq })
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tx == 0 {
            write!(f, "{}", self.gseq)
        } else {
            write!(f, "{}.{}", self.tx, self.gseq)
        }
    }
}

/// One event of the global log, with its run's agent, entrypoint and chain.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub cursor: EventCursor,
    pub agent: String,
    pub entrypoint: String,
    /// The run's correlation id (`docs/triggers.md`).
    pub correlation_id: Option<String>,
    /// How many triggers led to the run.
    pub depth: u32,
    pub event: crate::runs::RunEvent,
}

/// A page of the global log: the events, and the cursor to go on from (past what was read,
/// even where nothing was returned).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogPage {
    pub events: Vec<LoggedEvent>,
    pub next: EventCursor,
}

#[cfg(test)]
mod cursor_tests {
    use super::EventCursor;

    #[test]
    fn cursors_read_back_what_they_print() {
        for c in [
            EventCursor { tx: 0, gseq: 42 },
            EventCursor { tx: 731, gseq: 9 },
        ] {
            assert_eq!(EventCursor::parse(&c.to_string()), Some(c));
        }
        for bad in ["", "x", "1.x", "-3", "1.2.3"] {
            assert_eq!(EventCursor::parse(bad), None, "{bad}");
        }
        assert!(EventCursor { tx: 2, gseq: 1 } > EventCursor { tx: 1, gseq: 9 });
    }
}
