//! The loops that keep leases and the database healthy: heartbeat, reaper, retention, and the
//! one that follows what other nodes change in a shared store.

use std::sync::Arc;
use std::time::Instant;

use agentry_core::runs::LeaseRef;
use agentry_core::store::{StoreChange, StoreChanges};

use crate::state::{Abandon, AttemptKey, Inner};

/// Renews every lease this node holds, one write for all. A lease found lost (the run was
/// requeued because this node looked dead, or finished elsewhere) abandons that attempt; a
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
                .map(|(key, r)| {
                    if now.duration_since(r.last_heartbeat_event)
                        >= inner.settings.heartbeat_event_every
                    {
                        r.last_heartbeat_event = now;
                        heartbeat.push(key.run_id.clone());
                    }
                    LeaseRef {
                        run_id: key.run_id.clone(),
                        owner: inner.owner.clone(),
                        attempt: key.attempt,
                    }
                })
                .collect();
            (leases, heartbeat)
        };
        if leases.is_empty() {
            continue;
        }
        let asked_at = Instant::now();
        let until = inner.settings.clock.now_ms() + inner.settings.lease_ttl.as_millis() as i64;
        match inner.store.renew_leases(leases, until, heartbeat).await {
            Ok(renewals) => {
                let mut running = inner.running.lock();
                for r in renewals {
                    let key = AttemptKey {
                        run_id: r.run_id,
                        attempt: r.attempt,
                    };
                    let Some(run) = running.get_mut(&key) else {
                        continue;
                    };
                    if !r.held {
                        if run.abandon(Abandon::LeaseLost) {
                            inner.counters.lease_lost();
                            tracing::warn!(run.id = %key.run_id, attempt = key.attempt, "lost the lease of a running attempt; stopping it here");
                        }
                        continue;
                    }
                    run.lease_until = asked_at + inner.settings.lease_ttl;
                    if r.cancel_requested {
                        run.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!("renewing leases failed: {e}"),
        }
    }
}

/// Tells the node registry, every heartbeat, that this node is alive and how loaded it is.
/// Losing the name to another process (this one was silent past a lease TTL and a new one
/// took it) stops this one claiming: its running attempts are fenced by their owner anyway,
/// and at shutdown it hands nothing back, since what is leased under the name may be the
/// other's. A failed report is retried at the next heartbeat.
pub(crate) async fn node_report_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.heartbeat_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match inner.store.report_node(&inner.node_report()).await {
            Ok(true) => {}
            Ok(false) => {
                inner
                    .name_lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                inner.wake.notify_one();
                tracing::error!(node = %inner.settings.node, "another process has taken this node's name in the registry; this one claims no more runs (restart it under its own name)");
                return;
            }
            Err(e) => tracing::warn!("reporting this node to the registry failed: {e}"),
        }
    }
}

/// Stops this node's attempts whose lease it could not renew in time, before the lease
/// expires and another attempt may start (self-fencing). Apart from the heartbeat, because the
/// renewal itself may be what hangs.
pub(crate) async fn fence_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.fence_check_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let margin = inner.settings.fence_margin();
    loop {
        tick.tick().await;
        let now = Instant::now();
        for (key, r) in inner.running.lock().iter() {
            if now + margin >= r.lease_until && r.abandon(Abandon::Fenced) {
                tracing::warn!(
                    run.id = %key.run_id,
                    attempt = key.attempt,
                    "no lease renewal succeeded for too long; stopping the attempt before the lease expires"
                );
            }
        }
    }
}

/// Requeues runs whose lease expired: their node died or stalled.
pub(crate) async fn reaper_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.reap_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // This node's own attempts whose lease is surely still held (by the monotonic clock)
        // are alive whatever the wall clock says: they are renewed, not requeued.
        let alive: Vec<LeaseRef> = {
            let now = Instant::now();
            let margin = inner.settings.fence_margin();
            inner
                .running
                .lock()
                .iter()
                .filter(|(_, r)| now + margin < r.lease_until)
                .map(|(key, _)| LeaseRef {
                    run_id: key.run_id.clone(),
                    owner: inner.owner.clone(),
                    attempt: key.attempt,
                })
                .collect()
        };
        match inner
            .store
            .recover_leases(inner.settings.clock.now_ms(), None, alive)
            .await
        {
            Ok(recovered) if !recovered.is_empty() => {
                tracing::warn!(runs = recovered.len(), "requeued runs whose lease expired");
                for f in &recovered {
                    inner.publish(&f.events, Some(&f.run));
                }
                inner.runs_may_be_due();
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
        let before = inner.settings.clock.now_ms() - keep.as_millis() as i64;
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

/// Acts at once on what other nodes changed in a shared store (instead of at the next poll):
/// a run to claim wakes the dispatcher, a cancel reaches the attempt running here, new events
/// reach the followers here. A gap in the stream (`Missed`) does all of it.
pub(crate) async fn follow_other_nodes(inner: Arc<Inner>, mut changes: StoreChanges) {
    use futures_util::StreamExt;
    while let Some(change) = changes.next().await {
        match change {
            StoreChange::RunsDue => inner.runs_may_be_due(),
            StoreChange::CancelRequested { run_id } => {
                for (key, run) in inner.running.lock().iter() {
                    if key.run_id == run_id {
                        run.cancel();
                    }
                }
            }
            StoreChange::Events { run_id, seq } => inner.hub.poke(&run_id, seq),
            StoreChange::Missed => {
                inner.runs_may_be_due();
                inner.hub.poke_all();
            }
        }
    }
}
