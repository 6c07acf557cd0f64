//! Calls in flight: what a caller holds while a worker runs its call.
//!
//! A stream and a durable run's call share one implementation, [`InFlight`]: the call's
//! deadline (one timer per call, armed once), its credit window (how many chunks the worker
//! may run ahead; it starts small and doubles while the consumer keeps up), and what happens
//! when the caller goes away before the end (the call is cancelled; one that does not stop
//! within the grace period is stopped: its worker killed, or, still queued, skipped). A unary call
//! has a oneshot answer and no window, and is handled by [`PendingUnary`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use agentry_core::executor::{CallError, ChunkStream, Payload, RunCall as RunCallApi, RunItem};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};

use super::slots::{Lease, Mode};
use crate::worker::StreamItem;

/// Deals with a call that ran past its deadline (or that was abandoned and did not stop).
pub(super) fn expire(lease: Lease, id: u32, timeout: Duration, grace: Duration) {
    let running = match lease.mode {
        Mode::Exclusive => true,
        // Sync calls run in the order sent: only the first unanswered one is running.
        Mode::Sync { .. } => lease.worker.is_running_first(id),
        Mode::Shared => false,
    };
    if running {
        lease.worker.forget(id);
        lease
            .worker
            .kill(format!("a call ran past its deadline of {timeout:?}"));
    } else if matches!(lease.mode, Mode::Sync { .. }) {
        // Still queued behind another call: answer the caller now; the worker skips it.
        lease.worker.cancel(id);
        lease.worker.forget(id);
    } else {
        // Other calls share this worker: ask for a cancel, kill only if it does not happen.
        lease.worker.cancel(id);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still_running = !lease.worker.is_dead() && lease.worker.has_call(id);
            if still_running {
                lease.worker.kill(format!(
                    "a call ignored its cancellation after its deadline of {timeout:?}"
                ));
            }
            drop(lease);
        });
    }
}

/// Stops a call now: a worker running it is killed (with its process group), a call still
/// queued behind another is skipped.
pub(super) fn stop(lease: Lease, id: u32, reason: &str) {
    let running = match lease.mode {
        Mode::Sync { .. } => lease.worker.is_running_first(id),
        Mode::Exclusive | Mode::Shared => lease.worker.has_call(id),
    };
    if running {
        lease.worker.forget(id);
        lease.worker.kill(reason.to_string());
    } else {
        lease.worker.cancel(id);
        lease.worker.forget(id);
    }
}

/// A unary call waiting for its answer.
pub(super) struct PendingUnary {
    pub(super) lease: Option<Lease>,
    pub(super) id: u32,
    pub(super) rx: Option<oneshot::Receiver<Result<Payload, CallError>>>,
    pub(super) deadline: Instant,
    pub(super) timeout: Duration,
    pub(super) grace: Duration,
}

impl PendingUnary {
    pub(super) async fn wait(&mut self) -> Result<Payload, CallError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(CallError::Cancelled);
        };
        let outcome = tokio::time::timeout_at(self.deadline, rx).await;
        self.rx = None;
        let lease = self.lease.take();
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Crashed("the worker went away".into())),
            Err(_) => {
                if let Some(lease) = lease {
                    expire(lease, self.id, self.timeout, self.grace);
                }
                Err(CallError::Timeout(self.timeout))
            }
        }
    }
}

impl Drop for PendingUnary {
    /// The caller went away (its HTTP client disconnected) while the call runs. The worker stays
    /// leased until the call ends, so that no other call is queued behind it; async calls are
    /// cancelled, sync ones run to completion or to their deadline.
    fn drop(&mut self) {
        let (Some(rx), Some(lease)) = (self.rx.take(), self.lease.take()) else {
            return;
        };
        let (id, deadline, timeout, grace) = (self.id, self.deadline, self.timeout, self.grace);
        if lease.mode == Mode::Shared {
            lease.worker.cancel(id);
        }
        tokio::spawn(async move {
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                expire(lease, id, timeout, grace);
            }
        });
    }
}

/// How many chunks a worker may send ahead of its consumer. The window starts at `window`
/// and doubles while the consumer keeps up, up to `max`; what was consumed is given back once
/// half the window has been.
#[derive(Debug, Clone, Copy)]
pub(super) struct Credit {
    pub(super) window: u32,
    pub(super) max: u32,
    consumed: u32,
}

impl Credit {
    pub(super) fn new(window: u32, max: u32) -> Self {
        Self {
            window: window.min(max),
            max,
            consumed: 0,
        }
    }

    /// Counts one consumed chunk; returns the credit to grant the worker now, if any.
    fn consumed_one(&mut self) -> Option<u32> {
        self.consumed += 1;
        if self.consumed < self.window.div_ceil(2) {
            return None;
        }
        // Slow start: a generator cannot flood a slow client, and a fast one does not hog
        // the CPU the first chunk needs to reach the client.
        let growth = self.window.min(self.max - self.window);
        self.window += growth;
        let grant = self.consumed + growth;
        self.consumed = 0;
        Some(grant)
    }
}

/// Where a call's items arrive: a bounded channel (streams, whose window bounds them) or an
/// unbounded one (durable runs).
pub(super) trait Inbox: Send + 'static {
    type Item: CallItem;
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Item>>;
}

impl<T: CallItem> Inbox for mpsc::Receiver<T> {
    type Item = T;
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        mpsc::Receiver::poll_recv(self, cx)
    }
}

impl<T: CallItem> Inbox for mpsc::UnboundedReceiver<T> {
    type Item = T;
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        mpsc::UnboundedReceiver::poll_recv(self, cx)
    }
}

/// An item of a call with more than one answer.
pub(super) trait CallItem: Send + 'static {
    /// The call's last item (its end, its result or its failure).
    fn is_terminal(&self) -> bool;
    /// Whether it uses up credit (the worker waits for a grant once its window is used up).
    fn uses_credit(&self) -> bool;
    /// What to do with an item nobody will read, while an abandoned call stops.
    fn discard(&self, _lease: &Lease, _id: u32) {}
}

impl CallItem for StreamItem {
    fn is_terminal(&self) -> bool {
        !matches!(self, StreamItem::Chunk(_))
    }
    fn uses_credit(&self) -> bool {
        matches!(self, StreamItem::Chunk(_))
    }
}

impl CallItem for RunItem {
    fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunItem::Result(_) | RunItem::End(_) | RunItem::Failed(_)
        )
    }
    /// A run's events and log lines share its chunks' window, so that no frame kind can flood.
    fn uses_credit(&self) -> bool {
        matches!(
            self,
            RunItem::Chunk(_) | RunItem::Event { .. } | RunItem::Log { .. }
        )
    }
    fn discard(&self, lease: &Lease, id: u32) {
        // Nobody will save it; let the agent go on to its cancellation.
        if matches!(self, RunItem::Checkpoint(_)) {
            lease.worker.ack(id, false);
        }
    }
}

/// What polling a call gave.
pub(super) enum Polled<T> {
    Item(T),
    /// The worker went away without a terminal item.
    Closed,
    /// The call ended before.
    Finished,
    /// The deadline passed; the call was stopped.
    TimedOut,
}

/// A call in flight whose answer comes in several items.
pub(super) struct InFlight<R: Inbox> {
    lease: Option<Lease>,
    id: u32,
    /// Taken by the drop of an unfinished call, to drain it.
    rx: Option<R>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    grace: Duration,
    credit: Credit,
    finished: bool,
}

impl<R: Inbox> InFlight<R> {
    pub(super) fn new(
        lease: Lease,
        id: u32,
        rx: R,
        deadline: Instant,
        timeout: Duration,
        grace: Duration,
        credit: Credit,
    ) -> Self {
        Self {
            lease: Some(lease),
            id,
            rx: Some(rx),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            timeout,
            grace,
            credit,
            finished: false,
        }
    }

    pub(super) fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn id(&self) -> u32 {
        self.id
    }

    /// The next item. A chunk gives back credit when due; a terminal item releases the worker
    /// (its lease is returned, to be released by the caller's drop).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Polled<R::Item>> {
        let Some(rx) = self.rx.as_mut().filter(|_| !self.finished) else {
            return Poll::Ready(Polled::Finished);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.is_terminal() {
                    self.finished = true;
                } else if item.uses_credit()
                    && let Some(grant) = self.credit.consumed_one()
                    && let Some(lease) = &self.lease
                {
                    lease.worker.grant(self.id, grant);
                }
                return Poll::Ready(Polled::Item(item));
            }
            Poll::Ready(None) => {
                self.finished = true;
                self.lease = None;
                return Poll::Ready(Polled::Closed);
            }
            Poll::Pending => {}
        }
        ready!(self.deadline.as_mut().poll(cx));
        self.finished = true;
        if let Some(lease) = self.lease.take() {
            expire(lease, self.id, self.timeout, self.grace);
        }
        Poll::Ready(Polled::TimedOut)
    }

    /// Releases the worker after the terminal item; returns the lease for a last look.
    pub(super) fn release(&mut self) -> Option<Lease> {
        self.finished = true;
        self.lease.take()
    }
}

impl<R: Inbox> Drop for InFlight<R> {
    /// The caller went away before the end: cancel the call, and stop its worker if the call
    /// does not end within the grace period.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(lease) = self.lease.take() else {
            return;
        };
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let (id, grace) = (self.id, self.grace);
        lease.worker.cancel(id);
        tokio::spawn(async move {
            let stopped = tokio::time::timeout(grace, async {
                while let Some(item) = std::future::poll_fn(|cx| rx.poll_recv(cx)).await {
                    if item.is_terminal() {
                        return;
                    }
                    item.discard(&lease, id);
                }
            })
            .await;
            if stopped.is_err() {
                stop(
                    lease,
                    id,
                    "a cancelled call did not stop within its grace period",
                );
            }
        });
    }
}

/// A streaming call in progress. Dropping it before the end cancels the call in the worker.
pub struct CallStream {
    call: InFlight<mpsc::Receiver<StreamItem>>,
    total: Option<u32>,
}

impl CallStream {
    pub(super) fn new(call: InFlight<mpsc::Receiver<StreamItem>>) -> Self {
        Self { call, total: None }
    }
}

impl ChunkStream for CallStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Payload, CallError>>> {
        Poll::Ready(match ready!(self.call.poll(cx)) {
            Polled::Item(StreamItem::Chunk(payload)) => Some(Ok(payload)),
            Polled::Item(StreamItem::End(count)) => {
                self.call.release();
                self.total = Some(count);
                None
            }
            Polled::Item(StreamItem::Failed(e)) => {
                self.call.release();
                Some(Err(e))
            }
            Polled::Closed => Some(Err(CallError::Crashed("the worker went away".into()))),
            Polled::Finished => None,
            Polled::TimedOut => Some(Err(CallError::Timeout(self.call.timeout()))),
        })
    }

    fn total(&self) -> Option<u32> {
        self.total
    }
}

/// The call of a durable run in progress: chunks, context messages, then one terminal item.
/// Dropping it before the end cancels the call.
pub struct RunCall {
    call: InFlight<mpsc::UnboundedReceiver<RunItem>>,
    started: std::time::Instant,
    tag: String,
}

impl RunCall {
    pub(super) fn new(call: InFlight<mpsc::UnboundedReceiver<RunItem>>, tag: &str) -> Self {
        Self {
            call,
            started: std::time::Instant::now(),
            tag: tag.to_string(),
        }
    }
}

impl RunCallApi for RunCall {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<RunItem>> {
        Poll::Ready(match ready!(self.call.poll(cx)) {
            Polled::Item(item) => {
                if item.is_terminal()
                    && let Some(lease) = self.call.release()
                    && matches!(item, RunItem::Result(_))
                {
                    lease.pool.observe(&self.tag, self.started.elapsed());
                }
                Some(item)
            }
            Polled::Closed => Some(RunItem::Failed(CallError::Crashed(
                "the worker went away".into(),
            ))),
            Polled::Finished => None,
            Polled::TimedOut => Some(RunItem::Failed(CallError::Timeout(self.call.timeout()))),
        })
    }

    fn ack(&self, saved: bool) {
        if let Some(lease) = self.call.lease() {
            lease.worker.ack(self.call.id(), saved);
        }
    }

    fn cancel(&self) {
        if let Some(lease) = self.call.lease() {
            lease.worker.cancel(self.call.id());
        }
    }

    /// Stops the call now: a worker running it is killed (with its process group), a call still
    /// queued behind another is skipped.
    fn kill(&mut self, reason: &str) {
        let id = self.call.id();
        if let Some(lease) = self.call.release() {
            stop(lease, id, reason);
        }
    }
}
