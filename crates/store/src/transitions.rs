//! What a run's transitions write, the same for every backend: the columns an outcome sets, and
//! the JSON of the events that record it. The backends keep only their SQL.

use agentry_core::runs::{EventKind, LeaseRef, MAX_LEASE_LOSSES, Outcome, Run, RunStatus};

/// The terminal (or retry) event of an outcome and the columns it sets.
pub(crate) struct Transition<'a> {
    pub status: RunStatus,
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
    pub finished_at: Option<i64>,
    pub run_at: Option<i64>,
    pub event: EventKind,
    pub data: String,
}

pub(crate) fn transition(outcome: &Outcome, attempt: u32, now: i64) -> Transition<'_> {
    let status = outcome.status();
    match outcome {
        Outcome::Succeeded { result } => Transition {
            status,
            result: Some(result),
            error: None,
            finished_at: Some(now),
            run_at: None,
            event: EventKind::Succeeded,
            data: format!("{{\"attempt\":{attempt},\"result\":{result}}}"),
        },
        Outcome::Failed { error } | Outcome::TimedOut { error } | Outcome::Cancelled { error } => {
            Transition {
                status,
                result: None,
                error: Some(error),
                finished_at: Some(now),
                run_at: None,
                event: status.event(),
                data: format!("{{\"attempt\":{attempt},\"error\":{error}}}"),
            }
        }
        Outcome::Retry {
            error,
            run_at,
            delay_ms,
        } => Transition {
            status,
            result: None,
            error: Some(error),
            finished_at: None,
            run_at: Some(*run_at),
            event: EventKind::Retrying,
            data: format!(
                "{{\"attempt\":{attempt},\"retry_at\":{},\"delay_ms\":{},\"error\":{error}}}",
                iso(*run_at),
                delay_ms
            ),
        },
    }
}

/// What the reaper makes of an attempt whose node is gone: cancelled if a cancel was asked,
/// failed past the allowance of lost leases, else queued again at once.
pub(crate) struct LostAttempt {
    pub status: RunStatus,
    pub error: Option<&'static str>,
    pub finished_at: Option<i64>,
    pub event: EventKind,
    pub data: String,
}

impl LostAttempt {
    /// Whether the reaper's caller knows this attempt to be running still (its own, fresh by
    /// its monotonic clock): such a lease is never taken, whatever the wall clock says.
    pub(crate) fn is_alive(run: &Run, alive: &[LeaseRef]) -> bool {
        alive.iter().any(|l| {
            l.run_id == run.id
                && l.attempt == run.attempt
                && run.lease_owner.as_deref() == Some(l.owner.as_str())
        })
    }

    pub(crate) fn of(run: &Run, now: i64) -> LostAttempt {
        let (status, error, finished_at, event) = if run.cancel_requested {
            let e =
                r#"{"code":"cancelled","message":"the run was cancelled while its node was down"}"#;
            (
                RunStatus::Cancelled,
                Some(e),
                Some(now),
                EventKind::Cancelled,
            )
        } else if run.lease_losses + 1 >= MAX_LEASE_LOSSES {
            let e = r#"{"code":"lease_lost","message":"the run's node died or lost its lease too many times"}"#;
            (RunStatus::Failed, Some(e), Some(now), EventKind::Failed)
        } else {
            (RunStatus::Queued, None, None, EventKind::Retrying)
        };
        let data = match error {
            Some(e) => format!("{{\"attempt\":{},\"error\":{e}}}", run.attempt),
            None => format!(
                "{{\"attempt\":{},\"retry_at\":{},\"delay_ms\":0,\"error\":{{\"code\":\"lease_lost\",\"message\":\"the node running the attempt stopped\"}}}}",
                run.attempt,
                iso(now)
            ),
        };
        LostAttempt {
            status,
            error,
            finished_at,
            event,
            data,
        }
    }
}

/// The `run.queued` event's data.
pub(crate) fn queued_event_data(run: &Run) -> String {
    queued_event_data_parts(run.priority, run.run_at)
}

/// The same, from the fields it shows (before the run is stored).
pub(crate) fn queued_event_data_parts(priority: i32, run_at: i64) -> String {
    format!("{{\"priority\":{priority},\"run_at\":{}}}", iso(run_at))
}

/// The `run.started` event's data.
pub(crate) fn started_event_data(attempt: u32, node: &str) -> String {
    format!("{{\"attempt\":{attempt},\"node\":{}}}", json_str(node))
}

/// The `run.checkpoint` event's data.
pub(crate) fn checkpoint_event_data(seq: i64, state: &str) -> String {
    format!("{{\"checkpoint\":{seq},\"state\":{state}}}")
}

/// The data of a cancel of a queued run, and of its event.
pub(crate) const CANCELLED_BEFORE_START: &str =
    r#"{"code":"cancelled","message":"the run was cancelled before it started"}"#;

/// A time as the JSON string the API shows (RFC 3339, milliseconds, UTC).
pub(crate) fn iso(ms: i64) -> String {
    json_str(&agentry_core::time::rfc3339_ms(ms))
}

pub(crate) fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}
