//! The dispatcher: claims due runs within the caps and starts an attempt for each. It looks at
//! once when something may have queued a due run (a run created without a lease, a retry, a
//! requeue, another node's notice) and it has room, and otherwise sleeps until the next delayed
//! run is due (at most `idle_poll`). Freed capacity alone wakes it but does not make it claim:
//! see `Inner::runs_hinted`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentry_core::runs::ClaimRequest;

use crate::execute;
use crate::state::Inner;

/// How soon a dispatcher held back by a cluster-wide cap looks again: room freed on another node
/// is not announced (only new and requeued runs are).
const HELD_BACK_POLL: Duration = Duration::from_millis(50);

pub(crate) async fn dispatch_loop(inner: Arc<Inner>) {
    use std::sync::atomic::Ordering;
    let mut backoff = Duration::from_millis(50);
    // When to look even if nothing said runs are due: the poll, the next delayed run, a cap's
    // re-check, or the retry of a failed claim.
    let mut next_look = Instant::now();
    loop {
        // Register for wake-ups before looking, so none is lost in between.
        let woken = inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !inner.claiming() {
            return;
        }
        let per_agent = inner.free_capacity();
        let due = Instant::now() >= next_look;
        if per_agent.is_empty() {
            if due {
                // No room now: look once room frees up.
                inner.runs_hinted.store(true, Ordering::SeqCst);
                next_look = Instant::now() + inner.settings.idle_poll;
            }
        } else if inner.runs_hinted.swap(false, Ordering::SeqCst) | due {
            // The hint is cleared before the claim (one that comes during it makes the next
            // round look), and kept when the claim leaves out an agent with no room now: the
            // run hinted may be that agent's, claimable once its room frees.
            if per_agent.len() < inner.order.len() {
                inner.runs_hinted.store(true, Ordering::SeqCst);
            }
            next_look = Instant::now() + inner.settings.idle_poll;
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
                entrypoint_caps: inner.entrypoint_caps.clone(),
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
                        inner.runs_hinted.store(true, Ordering::SeqCst);
                        continue;
                    }
                    if claimed.held_back {
                        next_look = next_look.min(Instant::now() + HELD_BACK_POLL);
                    }
                    if let Some(due) = claimed.next_due {
                        let wait = Duration::from_millis(
                            (due - inner.settings.clock.now_ms()).max(0) as u64,
                        );
                        next_look = next_look.min(Instant::now() + wait);
                    }
                }
                Err(e) => {
                    tracing::warn!("claiming runs failed: {e}; retrying in {backoff:?}");
                    next_look = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let sleep_for = next_look.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(sleep_for, woken).await;
    }
}
