//! The one gap-free feed of a run's events, which SSE, WebSocket, `wait` and any future
//! follower use.
//!
//! The feed subscribes to the live hub first, then reads the log from the store, then follows
//! live, and goes back to the store whenever the live feed skips a sequence number (a slow
//! follower lagged, or the event came from another node) or stays quiet for a while. So it
//! never misses or repeats an event, and it ends after the run's terminal event (or when the
//! run is over and its log is gone, e.g. purged).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::runs::RunEvent;
use agentry_core::store::{RunStore, StoreError};

use crate::hub::{Published, Subscription};

/// Events read from the store per page while catching up.
const PAGE: usize = 500;
/// A live feed quiet for this long re-reads the store (events may come from another node).
const QUIET: Duration = Duration::from_secs(5);
/// Wait between two tries of a store that failed.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// Where a feed starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// After the event with this sequence number (0: from the first).
    After(i64),
    /// After the run's last event now: only what happens from here on.
    Now,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading pages from the store.
    CatchUp,
    /// Caught up: is the run still going?
    Check,
    /// The run is over: read what is left of its log, then end.
    Drain,
    Live,
    Done,
}

/// A run's events, in order, each once. See the module doc.
pub struct EventFeed {
    store: Arc<dyn RunStore>,
    sub: Subscription,
    run_id: String,
    after: i64,
    phase: Phase,
    page: VecDeque<RunEvent>,
}

impl EventFeed {
    pub(crate) async fn start(
        store: Arc<dyn RunStore>,
        sub: Subscription,
        run_id: &str,
        from: Follow,
    ) -> Result<Self, StoreError> {
        let (after, phase) = match from {
            Follow::After(n) => (n.max(0), Phase::CatchUp),
            // Subscribed before this read: whatever comes after it arrives live.
            Follow::Now => (store.last_event_seq(run_id).await?, Phase::Live),
        };
        Ok(Self {
            store,
            sub,
            run_id: run_id.to_string(),
            after,
            phase,
            page: VecDeque::new(),
        })
    }

    /// A feed whose subscription was taken before the event numbered `after` was published
    /// (e.g. before the run was created): it starts live, without reading the store.
    pub(crate) fn live(
        store: Arc<dyn RunStore>,
        sub: Subscription,
        run_id: &str,
        after: i64,
    ) -> Self {
        Self {
            store,
            sub,
            run_id: run_id.to_string(),
            after,
            phase: Phase::Live,
            page: VecDeque::new(),
        }
    }

    /// The sequence number of the last event handed out (or where the feed started).
    pub fn position(&self) -> i64 {
        self.after
    }

    /// The next event; `None` after the terminal one, or once the run is over.
    pub async fn next(&mut self) -> Option<Published> {
        loop {
            if let Some(event) = self.page.pop_front() {
                return Some(self.hand_out(Published {
                    event: Arc::new(event),
                    run: None,
                }));
            }
            match self.phase {
                Phase::Done => return None,
                Phase::CatchUp | Phase::Drain => {
                    match self
                        .store
                        .events_after(&self.run_id, self.after, PAGE)
                        .await
                    {
                        Ok(page) => {
                            if page.len() < PAGE {
                                self.phase = match self.phase {
                                    Phase::Drain => Phase::Done,
                                    _ => Phase::Check,
                                };
                            }
                            self.page.extend(page);
                        }
                        Err(e) => self.store_failed(e).await,
                    }
                }
                // A run that ended after the page was read has its last events (its terminal
                // one among them) after that page: read them before ending.
                Phase::Check => match self.store.get_run(&self.run_id).await {
                    Ok(Some(run)) if !run.status.is_terminal() => self.phase = Phase::Live,
                    Ok(Some(_)) => self.phase = Phase::Drain,
                    Ok(None) => self.phase = Phase::Done,
                    Err(e) => self.store_failed(e).await,
                },
                Phase::Live => match tokio::time::timeout(QUIET, self.sub.recv()).await {
                    Ok(Ok(Some(p))) => {
                        let seq = p.event.seq;
                        if seq <= self.after {
                            continue;
                        }
                        if seq != self.after + 1 {
                            self.phase = Phase::CatchUp; // a gap: the store has it
                            continue;
                        }
                        return Some(self.hand_out(p));
                    }
                    Ok(Ok(None)) => self.phase = Phase::Done,
                    // Lagged, or quiet for a while: re-read.
                    Ok(Err(_)) | Err(_) => self.phase = Phase::CatchUp,
                },
            }
        }
    }

    fn hand_out(&mut self, p: Published) -> Published {
        self.after = p.event.seq;
        if p.event.kind.is_terminal() {
            self.phase = Phase::Done;
            self.page.clear();
        }
        p
    }

    async fn store_failed(&self, e: StoreError) {
        tracing::warn!(run.id = %self.run_id, "reading run events failed: {e}");
        tokio::time::sleep(STORE_RETRY).await;
    }
}
