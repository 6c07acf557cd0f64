//! What the engine's tasks share: the store, the agents, this node's lease owner, the live
//! hub, and the bookkeeping of the attempts running here and the slots held for direct leases.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use agentry_core::agent::Agents;
use agentry_core::nodes::NodeReport;
use agentry_core::runs::{Run, RunEvent};
use agentry_core::store::RunStore;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::hub::EventHub;
use crate::settings::EngineSettings;

/// One attempt of one run. The engine's bookkeeping is keyed by this, never by the run alone:
/// when a lease is lost and this node claims the run's next attempt, the old attempt's cleanup
/// must not touch the new one's entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AttemptKey {
    pub(crate) run_id: String,
    pub(crate) attempt: u32,
}

/// What an executor listens to besides its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    None,
    /// Someone asked to cancel the run.
    Cancel,
    /// Stop without writing an outcome: the attempt is no longer this node's to finish.
    Abandon(Abandon),
}

/// Why an attempt is abandoned. None of these is a cancel: the run goes on elsewhere or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abandon {
    /// A renewal found the lease gone (another attempt or node has the run).
    LeaseLost,
    /// This node could not renew the lease for so long that it may expire: it stops the attempt
    /// itself before anyone else may take the run.
    Fenced,
    /// The engine is stopping; the next start requeues the run.
    Stopping,
    /// The attempt's signal went away. Only ever an abandon, never read as a cancel.
    Closed,
}

impl Abandon {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Abandon::LeaseLost => "the run's lease was lost",
            Abandon::Fenced => {
                "this node could not renew the run's lease before it would expire, so it stopped the attempt"
            }
            Abandon::Stopping => "the server is stopping",
            Abandon::Closed => "the attempt's bookkeeping went away",
        }
    }
}

pub(crate) struct Running {
    pub(crate) agent: String,
    pub(crate) signal: watch::Sender<Signal>,
    pub(crate) last_heartbeat_event: Instant,
    /// Until when the lease surely holds: the time the last successful claim or renewal was
    /// *sent*, plus the TTL. Past it (less a margin) the attempt fences itself.
    pub(crate) lease_until: Instant,
}

impl Running {
    /// Asks the attempt to cancel, unless it is already cancelling or abandoned.
    pub(crate) fn cancel(&self) {
        self.signal.send_if_modified(|s| {
            let was_none = *s == Signal::None;
            if was_none {
                *s = Signal::Cancel;
            }
            was_none
        });
    }

    /// Abandons the attempt (the first reason wins); false if it already was.
    pub(crate) fn abandon(&self, why: Abandon) -> bool {
        self.signal.send_if_modified(|s| {
            let fresh = !matches!(s, Signal::Abandon(_));
            if fresh {
                *s = Signal::Abandon(why);
            }
            fresh
        })
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn RunStore>,
    pub(crate) agents: Arc<Agents>,
    /// Agent ids in a fixed order, for fair claims.
    pub(crate) order: Vec<String>,
    /// The entrypoints' caps (`max_concurrency`), sent with every claim.
    pub(crate) entrypoint_caps: Vec<agentry_core::runs::EntrypointCap>,
    pub(crate) settings: EngineSettings,
    /// `node/incarnation`: the lease owner of everything this process claims.
    pub(crate) owner: String,
    pub(crate) hub: Arc<EventHub>,
    /// Wakes the dispatcher: capacity freed, or (with `runs_may_be_due`) runs to look for.
    pub(crate) wake: Notify,
    /// Something may have queued a due run since the dispatcher last looked (a run created
    /// without a lease, a retry, a requeue, another node's notice). Freed capacity alone does
    /// not make the dispatcher claim: on a shared database an empty claim is a transaction of
    /// its own, and a node whose runs are all leased as they are created would otherwise run
    /// one after every attempt. The dispatcher's poll looks regardless.
    pub(crate) runs_hinted: std::sync::atomic::AtomicBool,
    pub(crate) running: Mutex<HashMap<AttemptKey, Running>>,
    /// Slots held by submissions that may lease their run directly, per agent.
    pub(crate) reserved: Mutex<HashMap<String, usize>>,
    /// Rotates which agent claims first.
    pub(crate) turn: std::sync::atomic::AtomicUsize,
    pub(crate) stopping: watch::Sender<bool>,
    pub(crate) tasks: Mutex<JoinSet<()>>,
    pub(crate) counters: crate::metrics::EngineCounters,
    /// Another process took this node's name in the registry (this one was silent too long):
    /// it claims nothing more, and hands nothing back at shutdown (what is leased under the
    /// name may be the other's).
    pub(crate) name_lost: std::sync::atomic::AtomicBool,
    /// When this process started its engine (Unix ms), for the node registry.
    pub(crate) started_at: i64,
}

impl Inner {
    /// Due runs may be waiting: the dispatcher looks as soon as it has room.
    pub(crate) fn runs_may_be_due(&self) {
        self.runs_hinted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Whether this process may take more runs: not stopping, and still the holder of its name.
    pub(crate) fn claiming(&self) -> bool {
        !self.stopping() && !self.name_lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Holds one slot of `agent`'s capacity for a submission that may lease its run directly.
    pub(crate) fn reserve(self: &Arc<Self>, agent: &str) -> Option<Reservation> {
        // A cluster cap is counted in the claim, under the store's lock: a run leased in its
        // creating commit would pass it.
        if !self.claiming() || self.settings.cluster.is_set() {
            return None;
        }
        let cap = self.agents.by_id(agent)?.run_capacity();
        let running = self.running.lock();
        let mut reserved = self.reserved.lock();
        let total_reserved: usize = reserved.values().sum();
        if running.len() + total_reserved >= self.settings.max_running {
            return None;
        }
        let used = running.values().filter(|r| r.agent == agent).count()
            + reserved.get(agent).copied().unwrap_or(0);
        if used >= cap {
            return None;
        }
        *reserved.entry(agent.to_string()).or_default() += 1;
        Some(Reservation {
            inner: Arc::clone(self),
            agent: agent.to_string(),
        })
    }

    /// How many more runs each agent may start now, within the global cap. The agent that
    /// claims first rotates, so that one busy agent cannot starve the others of the global cap.
    pub(crate) fn free_capacity(&self) -> Vec<(String, usize)> {
        let running = self.running.lock();
        let reserved = self.reserved.lock();
        let mut global_free = self
            .settings
            .max_running
            .saturating_sub(running.len() + reserved.values().sum::<usize>());
        let mut per_agent: HashMap<&str, usize> = HashMap::new();
        for r in running.values() {
            *per_agent.entry(r.agent.as_str()).or_default() += 1;
        }
        for (agent, n) in reserved.iter() {
            *per_agent.entry(agent.as_str()).or_default() += n;
        }
        let n = self.order.len();
        let start = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let name = &self.order[(start + i) % n.max(1)];
            let Some(agent) = self.agents.by_id(name) else {
                continue;
            };
            let used = per_agent.get(name.as_str()).copied().unwrap_or(0);
            let free = agent.run_capacity().saturating_sub(used).min(global_free);
            global_free -= free;
            if free > 0 {
                out.push((name.clone(), free));
            }
        }
        out
    }

    /// What this node tells the registry about itself now.
    pub(crate) fn node_report(&self) -> NodeReport {
        NodeReport {
            name: self.settings.node.clone(),
            owner: self.owner.clone(),
            home: self.settings.home.clone(),
            role: self.settings.role,
            version: env!("CARGO_PKG_VERSION").to_string(),
            agents: self.order.clone(),
            capacity: self.settings.max_running,
            running: self.running.lock().len(),
        }
    }

    pub(crate) fn publish(&self, events: &[RunEvent], run: Option<&Run>) {
        self.hub.publish(events, run);
    }
}

/// A slot held for a direct lease; released on drop.
pub(crate) struct Reservation {
    pub(crate) inner: Arc<Inner>,
    pub(crate) agent: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut reserved = self.inner.reserved.lock();
            if let Some(n) = reserved.get_mut(&self.agent) {
                *n = n.saturating_sub(1);
            }
        }
        // The slot is free again: a dispatcher that found no room while it was held looks.
        self.inner.wake.notify_one();
    }
}
