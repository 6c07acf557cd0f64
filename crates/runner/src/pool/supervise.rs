//! Keeps every slot staffed: when a worker dies, its slot is respawned with exponential
//! backoff; workers that keep dying young put the agent in a reported crash loop instead of
//! a spin.

use std::sync::Arc;
use std::time::Duration;

use super::slots::{PoolInner, Slot, deliver};
use crate::worker::Worker;

/// A worker that lived less than this counts as an early death for crash-loop detection.
const EARLY_DEATH: Duration = Duration::from_secs(5);

/// Consecutive early deaths after which the agent is reported as crash-looping.
const CRASH_LOOP_AFTER: u32 = 5;

/// Longest wait between two respawns.
const MAX_RESPAWN_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps one slot staffed: waits for its worker to die, then respawns with backoff.
pub(super) async fn supervise(pool: Arc<PoolInner>, slot: usize, mut worker: Arc<Worker>) {
    let mut early_deaths: u32 = 0;
    loop {
        let reason = worker.wait_dead().await;
        let lived = worker.started_at.elapsed();
        {
            let mut state = pool.state.lock();
            if let Some(s) = state.slots.get_mut(slot) {
                s.worker = None;
                s.reset();
            }
            if state.closing {
                return;
            }
        }
        pool.idle.notify_waiters();
        tracing::warn!(agent.name = %pool.spec.agent, worker.pid = worker.pid, "worker died: {reason}; respawning");
        early_deaths = if lived < EARLY_DEATH {
            early_deaths + 1
        } else {
            0
        };
        let mut last_error = reason;
        loop {
            if early_deaths >= CRASH_LOOP_AFTER {
                let mut state = pool.state.lock();
                if state.crash_loop.is_none() {
                    tracing::error!(
                        agent.name = %pool.spec.agent,
                        "agent is crash-looping: {early_deaths} workers in a row died within {EARLY_DEATH:?} (last: {last_error}); still retrying with backoff"
                    );
                }
                state.crash_loop = Some(format!(
                    "{early_deaths} workers in a row died young (last: {last_error})"
                ));
                // With no worker left, the calls waiting for one would wait for as long as the
                // crash loop lasts (a durable run's wait has no deadline of its own): they fail
                // now, as new calls do, and runs retry with backoff.
                let stranded: Vec<_> = if state.slots.iter().any(Slot::live) {
                    Vec::new()
                } else {
                    state.waiters.drain(..).collect()
                };
                drop(state);
                drop(stranded);
            }
            let backoff = Duration::from_millis(100)
                .saturating_mul(1u32 << early_deaths.min(16))
                .min(MAX_RESPAWN_BACKOFF);
            if early_deaths > 0 {
                tokio::time::sleep(backoff).await;
            }
            if pool.state.lock().closing {
                return;
            }
            match Worker::spawn(&pool.spec).await {
                Ok(w) if w.hello.errors.is_empty() => {
                    worker = w;
                    break;
                }
                Ok(w) => {
                    let e = &w.hello.errors[0];
                    last_error = format!(
                        "entrypoint {} ({}) failed to import: {}: {}",
                        e.tag, e.r#where, e.r#type, e.message
                    );
                }
                Err(e) => last_error = e.to_string(),
            }
            tracing::warn!(agent.name = %pool.spec.agent, "worker respawn failed: {last_error}");
            early_deaths += 1;
        }
        let handoffs = {
            let mut state = pool.state.lock();
            if state.closing {
                worker.kill("the server is shutting down");
                return;
            }
            if let Some(s) = state.slots.get_mut(slot) {
                s.worker = Some(Arc::clone(&worker));
                s.reset();
            }
            if state.crash_loop.take().is_some() {
                tracing::info!(agent.name = %pool.spec.agent, "a worker started again after a crash loop");
            }
            pool.hand_to_waiters(&mut state)
        };
        deliver(handoffs);
    }
}
