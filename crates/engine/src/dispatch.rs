//! The dispatcher: claims due runs within the caps and starts an attempt for each. It is
//! woken at once by new runs and freed capacity, and otherwise sleeps until the next delayed
//! run is due (at most `idle_poll`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentry_core::runs::ClaimRequest;

use crate::execute;
use crate::state::Inner;

/// How soon a dispatcher held back by a cluster-wide cap looks again: room freed on another node
/// is not announced (only new and requeued runs are).
const HELD_BACK_POLL: Duration = Duration::from_millis(50);

pub(crate) async fn dispatch_loop(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Register for wake-ups before looking, so none is lost in between.
        let woken = inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !inner.claiming() {
            return;
        }
        let per_agent = inner.free_capacity();
        let mut sleep_for = inner.settings.idle_poll;
        if !per_agent.is_empty() {
            let wanted: usize = per_agent.iter().map(|(_, n)| n).sum();
            let now = inner.settings.clock.now_ms();
            let asked_at = Instant::now();
            let request = ClaimRequest {
                node: inner.settings.node.clone(),
                owner: inner.owner.clone(),
                now,
                lease_until: now + inner.settings.lease_ttl.as_millis() as i64,
                per_agent,
                cluster: inner.settings.cluster,
            };
            match inner.store.claim_runs(request).await {
                Ok(claimed) => {
                    backoff = Duration::from_millis(50);
                    let got = claimed.runs.len();
                    inner.counters.claimed(got);
                    for c in claimed.runs {
                        execute::start(&inner, c, asked_at);
                    }
                    if got >= wanted {
                        // Maybe more are due: look again once capacity frees up.
                        continue;
                    }
                    if claimed.held_back {
                        sleep_for = sleep_for.min(HELD_BACK_POLL);
                    }
                    if let Some(due) = claimed.next_due {
                        let wait = Duration::from_millis(
                            (due - inner.settings.clock.now_ms()).max(0) as u64,
                        );
                        sleep_for = sleep_for.min(wait);
                    }
                }
                Err(e) => {
                    tracing::warn!("claiming runs failed: {e}; retrying in {backoff:?}");
                    sleep_for = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = tokio::time::timeout(sleep_for, woken).await;
    }
}
