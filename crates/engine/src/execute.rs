//! One attempt of one run, from claim to its fenced end.
//!
//! Events the agent produces (chunks, `ctx.emit`, `ctx.log`) are committed in order; while a
//! commit is in flight the next ones gather, so a chatty agent costs one commit per batch, not
//! per event. A checkpoint is committed before the agent is let go on. The attempt's start
//! (`run.started`) is written once a worker has the call, with the attempt's first other write
//! or alone shortly after. The attempt ends with `finish_run`, refused by the store if the
//! lease was lost meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentry_core::ErrorCode;
use agentry_core::executor::{CallError, RunItem};
use agentry_core::runs::{AttemptStart, ClaimedRun, EventKind, LeaseRef, NewEvent, Outcome, Run};
use agentry_core::store::StoreError;
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::state::{Abandon, AttemptKey, Inner, Running, Signal};

/// The most items of one attempt (chunks, events, log lines) gathered into one commit.
const MAX_ITEMS_PER_COMMIT: usize = 512;

/// Registers the claimed attempt and spawns its executor. `asked_at` is when the claim was
/// sent: the lease surely holds until then plus the TTL.
pub(crate) fn start(inner: &Arc<Inner>, claimed: ClaimedRun, asked_at: Instant) {
    let (signal, rx) = watch::channel(if claimed.run.cancel_requested {
        Signal::Cancel
    } else {
        Signal::None
    });
    let key = AttemptKey {
        run_id: claimed.run.id.clone(),
        attempt: claimed.run.attempt,
    };
    inner.running.lock().insert(
        key.clone(),
        Running {
            agent: claimed.run.agent.clone(),
            signal,
            last_heartbeat_event: Instant::now(),
            lease_until: asked_at + inner.settings.lease_ttl,
        },
    );
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        execute(&inner, claimed, rx).await;
        inner.running.lock().remove(&key);
        // After the slot is free: a hint its end left (see `finish`) finds the room.
        inner.wake.notify_one();
    });
}

/// The signal as it stands after `changed()` answered `changed`: a closed channel abandons.
fn signal_after(
    changed: Result<(), watch::error::RecvError>,
    signal: &watch::Receiver<Signal>,
) -> Signal {
    match changed {
        Ok(()) => *signal.borrow(),
        Err(_) => Signal::Abandon(Abandon::Closed),
    }
}

/// What to do after one item from the call.
enum Step {
    Continue,
    Checkpoint(String),
    Done(Result<String, CallError>),
    /// The attempt wrote more than its caps allow.
    OverBudget(String),
}

/// What one attempt has written to its run's log, against its caps (`runs.max_events_per_attempt`,
/// `runs.max_event_bytes_per_attempt`): an agent that floods `ctx.emit`, `ctx.log` or chunks
/// fails instead of filling the disk.
pub(crate) struct Budget {
    events: u64,
    bytes: u64,
    max_events: u64,
    max_bytes: u64,
}

impl Budget {
    fn new(inner: &Inner) -> Self {
        Self {
            events: 0,
            bytes: 0,
            max_events: inner.settings.max_events_per_attempt,
            max_bytes: inner.settings.max_event_bytes_per_attempt,
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), String> {
        self.events += 1;
        self.bytes = self.bytes.saturating_add(bytes as u64);
        if self.events > self.max_events {
            return Err(format!(
                "the run wrote more than {} events in one attempt (runs.max_events_per_attempt)",
                self.max_events
            ));
        }
        if self.bytes > self.max_bytes {
            return Err(format!(
                "the run wrote more than {} bytes of events in one attempt (runs.max_event_bytes_per_attempt)",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

/// A kind an agent may give its events: not the runtime's (`run.*`), at most 200 characters,
/// none of them a control character (a newline in an SSE `event:` line would break the
/// stream for every reader).
fn is_agent_event_kind(kind: &str) -> bool {
    !kind.is_empty()
        && !kind.starts_with("run.")
        && kind.chars().count() <= 200
        && !kind.chars().any(char::is_control)
}

/// JSON text from a worker, checked before it is stored or forwarded: anything else is kept as
/// a JSON string of its (lossy) text, so a follower never receives broken JSON.
fn json_or_string(bytes: &[u8]) -> String {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
        && let Ok(text) = std::str::from_utf8(bytes)
    {
        return text.to_string();
    }
    serde_json::Value::from(String::from_utf8_lossy(bytes).into_owned()).to_string()
}

fn step(item: RunItem, chunks: &mut u64, batch: &mut Vec<NewEvent>, budget: &mut Budget) -> Step {
    let event = match item {
        RunItem::Chunk(p) => {
            let value = json_or_string(p.as_str().as_bytes());
            let event = NewEvent::new(
                EventKind::Chunk,
                format!("{{\"index\":{chunks},\"value\":{value}}}"),
            );
            *chunks += 1;
            event
        }
        // The runtime's own kinds are not the agent's to write: such an event could end a
        // follower's stream early. The worker refuses them; one that slips through is logged.
        RunItem::Event { kind, .. } if !is_agent_event_kind(&kind) => {
            let message = format!(
                "the agent emitted an event of a kind it may not use, a reserved kind or not printable ({}); it was dropped",
                serde_json::Value::from(kind.chars().take(200).collect::<String>())
            );
            let data = serde_json::json!({"level": "warning", "message": message}).to_string();
            NewEvent::new(EventKind::Log, data)
        }
        RunItem::Event { kind, data } => {
            NewEvent::new(EventKind::Custom(kind), json_or_string(&data))
        }
        RunItem::Log { level, message } => {
            let data = serde_json::json!({"level": level, "message": message}).to_string();
            NewEvent::new(EventKind::Log, data)
        }
        RunItem::Checkpoint(state) => {
            // A checkpoint is stored twice (its row and its event): charged like an event.
            if let Err(why) = budget.charge(2 * state.len()) {
                return Step::OverBudget(why);
            }
            return Step::Checkpoint(json_or_string(&state));
        }
        RunItem::Result(p) => return Step::Done(Ok(json_or_string(p.as_str().as_bytes()))),
        RunItem::End(_) => return Step::Done(Ok("null".into())),
        RunItem::Failed(e) => return Step::Done(Err(e)),
    };
    if let Err(why) = budget.charge(event.data.len() + event.kind.as_str().len()) {
        return Step::OverBudget(why);
    }
    batch.push(event);
    Step::Continue
}

async fn execute(inner: &Arc<Inner>, claimed: ClaimedRun, mut signal: watch::Receiver<Signal>) {
    let run = claimed.run;
    let lease = LeaseRef {
        run_id: run.id.clone(),
        owner: inner.owner.clone(),
        attempt: run.attempt,
    };
    let mut start = None;
    let outcome = match attempt(
        inner,
        &run,
        &lease,
        claimed.checkpoint,
        &mut signal,
        &mut start,
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(why) => return abandoned(inner, &lease, why).await,
    };
    // A commit that fails (a busy or full disk) is retried while the attempt is still
    // registered, so its lease is still renewed; only a lost lease, a fence or the shutdown
    // ends the retries (then the run is requeued: at-least-once).
    let mut backoff = Duration::from_millis(50);
    loop {
        match inner
            .store
            .finish_run(lease.clone(), outcome.clone(), start.clone())
            .await
        {
            Ok(f) => {
                inner.counters.ended(f.run.status);
                // A retry is due after its backoff (the next claim says when), and a run of a
                // concurrency key held up the key's next run: either may have made a run
                // claimable. The wake comes once the attempt's slot is free.
                if f.run.status == agentry_core::runs::RunStatus::Queued
                    || f.run.concurrency_key.is_some()
                {
                    inner
                        .runs_hinted
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                return inner.publish(&f.events, Some(&f.run));
            }
            Err(StoreError::LeaseLost) => {
                inner.counters.lease_lost();
                tracing::warn!(run.id = %run.id, "the run's lease was taken over; its result is dropped");
                return;
            }
            Err(e) => {
                if let Signal::Abandon(why) = *signal.borrow() {
                    tracing::error!(run.id = %run.id, "could not record the end of a run ({e}), and gave up: {}", why.reason());
                    return;
                }
                tracing::warn!(run.id = %run.id, "could not record the end of a run: {e}; retrying in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = signal.changed() => {}
        }
        backoff = (backoff * 2).min(FINISH_RETRY_MAX);
    }
}

/// The longest pause between two tries to record an attempt's end.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Says why an attempt stopped without an outcome: in the log, and for a fenced attempt in
/// the run's events too (written only while the lease is still this attempt's, so never over
/// a newer attempt's).
async fn abandoned(inner: &Inner, lease: &LeaseRef, why: Abandon) {
    match why {
        Abandon::Stopping => return,
        Abandon::Fenced => {
            tracing::warn!(run.id = %lease.run_id, attempt = lease.attempt, "{}", why.reason());
        }
        Abandon::LeaseLost | Abandon::Closed => {
            tracing::warn!(run.id = %lease.run_id, attempt = lease.attempt, "stopped an attempt: {}", why.reason());
            return;
        }
    }
    let data = serde_json::json!({"attempt": lease.attempt, "reason": why.reason()}).to_string();
    let event = NewEvent::new(EventKind::Fenced, data);
    if let Ok(events) = inner.store.append_events(lease.clone(), vec![event]).await {
        inner.publish(&events, None);
    }
}

/// How long after its code started an attempt that has written nothing else writes its
/// `run.started` event alone. An attempt that ends or emits sooner writes it with that write,
/// so a short run costs one commit for its start and end together.
const START_EVENT_AFTER: Duration = Duration::from_millis(10);

/// Runs the attempt to its outcome, or says why it was abandoned. `start` is the attempt's
/// start while it is not yet written (the caller writes it with the outcome).
async fn attempt(
    inner: &Arc<Inner>,
    run: &Run,
    lease: &LeaseRef,
    checkpoint: Option<String>,
    signal: &mut watch::Receiver<Signal>,
    start: &mut Option<AttemptStart>,
) -> Result<Outcome, Abandon> {
    match *signal.borrow() {
        Signal::Cancel => return Ok(cancelled("the run was cancelled before it started")),
        Signal::Abandon(why) => return Err(why),
        Signal::None => {}
    }
    let Some(agent) = inner.agents.by_id(&run.agent) else {
        return Ok(Outcome::Failed {
            error: error_json(
                ErrorCode::AgentNotFound,
                "the agent is not served here",
                None,
            ),
        });
    };
    let context = format!(
        "{{\"id\":{},\"attempt\":{},\"state\":{}}}",
        serde_json::Value::from(run.id.as_str()),
        run.attempt,
        checkpoint.as_deref().unwrap_or("null")
    );
    let timeout = Duration::from_millis(run.timeout_ms.max(1) as u64);
    // Only an agent with named executors looks up which one the run named.
    let named = if agent.named_executors.is_empty() {
        None
    } else {
        match inner.store.run_links(&run.id).await {
            Ok(links) => links.and_then(|l| l.executor),
            Err(e) => {
                let why = CallError::Unavailable(format!("cannot read the run's executor: {e}"));
                return Ok(decide(inner, run, Err(why), false));
            }
        }
    };
    let Some(executor) = agent.executor_for(named.as_deref()) else {
        return Ok(Outcome::Failed {
            error: error_json(
                ErrorCode::Unavailable,
                &format!(
                    "this node has no executor `{}` for agent {}: configure every node alike",
                    named.as_deref().unwrap_or_default(),
                    agent.config.agent_name
                ),
                None,
            ),
        });
    };
    let call = tokio::select! {
        call = executor.run(&run.entrypoint, &run.input, &context, timeout) => call,
        changed = signal.changed() => {
            return match signal_after(changed, signal) {
                Signal::Abandon(why) => Err(why),
                _ => Ok(cancelled("the run was cancelled before it started")),
            };
        }
    };
    let mut call = match call {
        Ok(call) => call,
        // The pool closed for shutdown: leave the run leased; the next start requeues it
        // without using up an attempt.
        Err(_) if inner.stopping() => return Err(Abandon::Stopping),
        Err(e) => return Ok(decide(inner, run, Err(e), false)),
    };
    // A worker has the call: the code starts now (waiting for a worker was not running).
    *start = Some(AttemptStart {
        at: inner.settings.clock.now_ms(),
        node: inner.settings.node.clone(),
    });
    let mut start_due = Some(tokio::time::Instant::now() + START_EVENT_AFTER);
    let mut chunks = 0u64;
    let mut budget = Budget::new(inner);
    let mut batch = Vec::new();
    let mut cancel_at: Option<tokio::time::Instant> = None;
    loop {
        // A cancel may have arrived while a write was awaited (`unless_abandoned` sees changes
        // of the signal too): act on the signal as it stands.
        if cancel_at.is_none() && *signal.borrow() == Signal::Cancel {
            call.cancel();
            cancel_at = Some(tokio::time::Instant::now() + inner.settings.cancel_grace);
        }
        let item = tokio::select! {
            biased;
            changed = signal.changed() => {
                match signal_after(changed, signal) {
                    Signal::Abandon(why) => {
                        call.kill(why.reason());
                        return Err(why);
                    }
                    Signal::Cancel if cancel_at.is_none() => {
                        call.cancel();
                        cancel_at = Some(tokio::time::Instant::now() + inner.settings.cancel_grace);
                    }
                    _ => {}
                }
                continue;
            }
            _ = sleep_until(start_due) => {
                start_due = None;
                if let Err(why) = unless_abandoned(signal, record_start(inner, lease, start)).await.and_then(|r| r) {
                    call.kill(why.reason());
                    return Err(why);
                }
                continue;
            }
            _ = sleep_until(cancel_at) => {
                call.kill("a cancelled run did not stop within its grace period");
                if record_start(inner, lease, start).await.is_ok() {
                    let _ = flush(inner, lease, &mut batch).await;
                }
                return Ok(cancelled("the run was cancelled; it did not stop within its grace period and its worker was stopped"));
            }
            item = call.next() => item,
        };
        let Some(item) = item else {
            return Ok(decide(
                inner,
                run,
                Err(CallError::Crashed(
                    "the call ended without an answer".into(),
                )),
                cancel_at.is_some(),
            ));
        };
        let mut next = step(item, &mut chunks, &mut batch, &mut budget);
        // Gather whatever else is ready into the same commit, up to a bound: each item taken
        // gives the worker credit back, so a fast agent could otherwise keep this loop going.
        let mut gathered = 1;
        while matches!(next, Step::Continue) && gathered < MAX_ITEMS_PER_COMMIT {
            gathered += 1;
            match call.next().now_or_never() {
                Some(Some(item)) => next = step(item, &mut chunks, &mut batch, &mut budget),
                _ => break,
            }
        }
        // The start goes before the first event or checkpoint; a result carries it itself.
        if (!batch.is_empty() || matches!(next, Step::Checkpoint(_)))
            && let Err(why) = unless_abandoned(signal, record_start(inner, lease, start))
                .await
                .and_then(|r| r)
        {
            call.kill(why.reason());
            return Err(why);
        }
        let flushed = match unless_abandoned(signal, flush(inner, lease, &mut batch)).await {
            Ok(flushed) => flushed,
            Err(why) => {
                call.kill(why.reason());
                return Err(why);
            }
        };
        match flushed {
            Ok(()) => {}
            Err(Flushed::LeaseLost) => {
                call.kill(Abandon::LeaseLost.reason());
                return Err(Abandon::LeaseLost);
            }
            // Events that cannot be stored fail the attempt (retriably): a run never ends
            // `succeeded` with chunks missing from its log.
            Err(Flushed::Failed(e)) => {
                call.kill("the run's events could not be stored");
                let error =
                    CallError::Unavailable(format!("the run's events could not be stored: {e}"));
                return Ok(decide(inner, run, Err(error), cancel_at.is_some()));
            }
        }
        match next {
            Step::Continue => {}
            Step::OverBudget(why) => {
                call.kill(&why);
                // A cancel asked for first still wins: the client said the run should not count.
                if cancel_at.is_some() {
                    return Ok(cancelled("the run was cancelled while it ran"));
                }
                return Ok(Outcome::Failed {
                    error: error_json(ErrorCode::PayloadTooLarge, &why, None),
                });
            }
            Step::Checkpoint(state) => {
                let saved =
                    unless_abandoned(signal, inner.store.save_checkpoint(lease.clone(), state));
                let saved = match saved.await {
                    Ok(saved) => saved,
                    Err(why) => {
                        call.kill(why.reason());
                        return Err(why);
                    }
                };
                match saved {
                    Ok(event) => {
                        inner.publish(std::slice::from_ref(&event), None);
                        call.ack(true);
                    }
                    Err(StoreError::LeaseLost) => {
                        call.kill(Abandon::LeaseLost.reason());
                        return Err(Abandon::LeaseLost);
                    }
                    Err(e) => {
                        tracing::warn!(run.id = %run.id, "a checkpoint could not be saved: {e}");
                        call.ack(false);
                    }
                }
            }
            // Workers stopped by the shutdown are not the agent's fault.
            Step::Done(Err(CallError::Crashed(_) | CallError::Unavailable(_)))
                if inner.stopping() =>
            {
                return Err(Abandon::Stopping);
            }
            Step::Done(result) => return Ok(decide(inner, run, result, cancel_at.is_some())),
        }
    }
}

/// Awaits a store write of the attempt, unless the attempt is abandoned first (a fence, a lost
/// lease): a write that hangs on a stalled disk must not keep the agent's code running past
/// the lease. The write itself may still land; the store fences it by the lease.
async fn unless_abandoned<T>(
    signal: &mut watch::Receiver<Signal>,
    write: impl std::future::Future<Output = T>,
) -> Result<T, Abandon> {
    tokio::pin!(write);
    loop {
        if let Signal::Abandon(why) = *signal.borrow() {
            return Err(why);
        }
        tokio::select! {
            out = &mut write => return Ok(out),
            changed = signal.changed() => {
                if let Signal::Abandon(why) = signal_after(changed, signal) {
                    return Err(why);
                }
            }
        }
    }
}

/// Writes the attempt's start if it is not written yet. A store that fails leaves it pending
/// (the outcome's commit carries it); a lost lease abandons the attempt.
async fn record_start(
    inner: &Inner,
    lease: &LeaseRef,
    start: &mut Option<AttemptStart>,
) -> Result<(), Abandon> {
    let Some(pending) = start.clone() else {
        return Ok(());
    };
    match inner.store.start_attempt(lease.clone(), pending).await {
        Ok(event) => {
            *start = None;
            inner.publish(std::slice::from_ref(&event), None);
            Ok(())
        }
        Err(StoreError::LeaseLost) => Err(Abandon::LeaseLost),
        Err(e) => {
            tracing::warn!(run.id = %lease.run_id, "the start of an attempt could not be saved yet: {e}");
            Ok(())
        }
    }
}

/// Why gathered events were not committed.
enum Flushed {
    LeaseLost,
    Failed(StoreError),
}

/// Commits the gathered events.
async fn flush(inner: &Inner, lease: &LeaseRef, batch: &mut Vec<NewEvent>) -> Result<(), Flushed> {
    if batch.is_empty() {
        return Ok(());
    }
    match inner
        .store
        .append_events(lease.clone(), std::mem::take(batch))
        .await
    {
        Ok(events) => {
            inner.publish(&events, None);
            Ok(())
        }
        Err(StoreError::LeaseLost) => Err(Flushed::LeaseLost),
        Err(e) => {
            tracing::warn!(run.id = %lease.run_id, "run events could not be saved: {e}");
            Err(Flushed::Failed(e))
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn cancelled(message: &str) -> Outcome {
    Outcome::Cancelled {
        error: error_json(ErrorCode::Cancelled, message, None),
    }
}

/// Turns the call's answer into the attempt's outcome: retriable failures come back with
/// backoff while attempts remain; deadlines and cancellations are final.
fn decide(
    inner: &Inner,
    run: &Run,
    result: Result<String, CallError>,
    cancel_requested: bool,
) -> Outcome {
    // Once a cancel was requested, the run ends cancelled however the attempt ended: the
    // client asked for it not to count.
    if cancel_requested {
        return cancelled("the run was cancelled while it ran");
    }
    let err = match result {
        Ok(result) => return Outcome::Succeeded { result },
        Err(e) => e,
    };
    let (retriable, error) = match &err {
        CallError::Agent {
            exc_type,
            message,
            traceback,
            retriable,
        } => (
            *retriable,
            error_json(
                ErrorCode::AgentError,
                message,
                Some((exc_type.as_str(), traceback.as_str())),
            ),
        ),
        CallError::Timeout(_) => {
            return Outcome::TimedOut {
                error: error_json(ErrorCode::TimeoutError, &err.to_string(), None),
            };
        }
        CallError::Cancelled => return cancelled("the run was cancelled while it ran"),
        CallError::NoSuchEntrypoint(_) => (false, error_json(err.code(), &err.to_string(), None)),
        CallError::Crashed(_) | CallError::Unavailable(_) => {
            (true, error_json(err.code(), &err.to_string(), None))
        }
    };
    if retriable && run.may_retry() {
        let delay_ms = run
            .backoff
            .delay(run.attempt, rand::random::<f64>())
            .as_millis() as i64;
        Outcome::Retry {
            error,
            run_at: inner.settings.clock.now_ms() + delay_ms,
            delay_ms,
        }
    } else {
        Outcome::Failed { error }
    }
}

/// The stored error of a run: `{code, message, type?, traceback?}`.
pub(crate) fn error_json(code: ErrorCode, message: &str, exc: Option<(&str, &str)>) -> String {
    let mut v = serde_json::json!({"code": code.as_str(), "message": message});
    if let Some((ty, tb)) = exc {
        v["type"] = ty.into();
        v["traceback"] = tb.into();
    }
    v.to_string()
}
