//! The loops that keep leases and the database healthy: heartbeat, reaper, retention.

use std::sync::Arc;
use std::time::Instant;

use agentry_core::runs::{LeaseRef, now_ms};

use crate::state::{Inner, Signal};

/// Renews every lease this node holds, one write for all. A lease found lost (the run was
/// requeued because this node looked dead, or finished elsewhere) abandons its executor; a
/// cancel requested through another node reaches the executor here.
pub(crate) async fn heartbeat_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.heartbeat_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (leases, heartbeat) = {
            let mut running = inner.running.lock();
            let now = Instant::now();
            let mut heartbeat = Vec::new();
            let leases: Vec<LeaseRef> = running
                .iter_mut()
                .map(|(id, r)| {
                    if now.duration_since(r.last_heartbeat_event)
                        >= inner.settings.heartbeat_event_every
                    {
                        r.last_heartbeat_event = now;
                        heartbeat.push(id.clone());
                    }
                    LeaseRef {
                        run_id: id.clone(),
                        owner: inner.owner.clone(),
                        attempt: r.attempt,
                    }
                })
                .collect();
            (leases, heartbeat)
        };
        if leases.is_empty() {
            continue;
        }
        let until = now_ms() + inner.settings.lease_ttl.as_millis() as i64;
        match inner.store.renew_leases(leases, until, heartbeat).await {
            Ok(renewals) => {
                let running = inner.running.lock();
                for r in renewals {
                    let Some(run) = running.get(&r.run_id) else {
                        continue;
                    };
                    if !r.held {
                        tracing::warn!(run.id = %r.run_id, "lost the lease of a running run; stopping it here");
                        run.signal.send_replace(Signal::Abandon);
                    } else if r.cancel_requested && *run.signal.borrow() == Signal::None {
                        run.signal.send_replace(Signal::Cancel);
                    }
                }
            }
            Err(e) => tracing::warn!("renewing leases failed: {e}"),
        }
    }
}

/// Requeues runs whose lease expired: their node died or stalled.
pub(crate) async fn reaper_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.reap_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inner.store.recover_leases(now_ms(), None).await {
            Ok(recovered) if !recovered.is_empty() => {
                tracing::warn!(runs = recovered.len(), "requeued runs whose lease expired");
                for f in &recovered {
                    inner.publish(&f.events, Some(&f.run));
                }
                inner.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("looking for expired leases failed: {e}"),
        }
    }
}

/// Deletes finished runs past the retention age, a small batch per transaction, so that the
/// writer interleaves dispatch work between batches.
pub(crate) async fn retention_loop(inner: Arc<Inner>) {
    let Some(keep) = inner.settings.retention else {
        return;
    };
    let mut tick = tokio::time::interval(inner.settings.retention_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let before = now_ms() - keep.as_millis() as i64;
        let mut total = 0usize;
        loop {
            match inner
                .store
                .purge_finished(before, inner.settings.purge_batch)
                .await
            {
                Ok(n) => {
                    total += n;
                    if n < inner.settings.purge_batch {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!("deleting old runs failed: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(runs = total, "deleted finished runs past the retention age");
        }
    }
}
