//! The engine's tuning, derived from the `runs` section of the configuration.

use std::time::Duration;

use agentry_core::nodes::NodeRole;
use agentry_core::runs::{Clock, ClusterCaps};
use agentry_core::settings::RunsConfig;

/// Tuning of the engine, derived from the `runs` section of the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// This node's stable name (its previous incarnation's runs are requeued at start-up).
    pub node: String,
    /// The id of this node's state directory (see `NodeReport::home`); empty when unknown.
    pub home: String,
    /// What this node does, as the node registry shows it.
    pub role: NodeRole,
    /// Runs executing at once on this node, all agents together.
    pub max_running: usize,
    /// Caps over all the nodes of a shared store.
    pub cluster: ClusterCaps,
    /// How long a claim holds a run without renewal.
    pub lease_ttl: Duration,
    /// How often leases are renewed.
    pub heartbeat_every: Duration,
    /// Least time between two `run.heartbeat` events of one run.
    pub heartbeat_event_every: Duration,
    /// How often expired leases of other (dead) nodes are looked for.
    pub reap_every: Duration,
    /// How long a cancelled running run may take to stop before its worker is killed.
    pub cancel_grace: Duration,
    /// Finished runs older than this are deleted. `None`: kept forever.
    pub retention: Option<Duration>,
    pub retention_every: Duration,
    /// Runs deleted per retention transaction (small, so dispatch never waits long).
    pub purge_batch: usize,
    /// Longest sleep of an idle dispatcher (a safety net; wake-ups are immediate).
    pub idle_poll: Duration,
    /// What one attempt may write to its run's log: events, and bytes of their data.
    pub max_events_per_attempt: u64,
    pub max_event_bytes_per_attempt: u64,
    /// The wall clock of due times and lease expiries (the system's; tests move it).
    pub clock: Clock,
}

impl EngineSettings {
    /// The engine's settings for this node, from the configuration's `runs` section.
    pub fn new(node: String, runs: &RunsConfig) -> Self {
        Self {
            node,
            home: String::new(),
            role: NodeRole::Serve,
            max_running: runs.max_running,
            cluster: ClusterCaps {
                total: runs.cluster_max_running,
                per_agent: runs.cluster_max_running_per_agent,
            },
            lease_ttl: runs.lease_ttl(),
            heartbeat_every: runs.heartbeat_every(),
            heartbeat_event_every: runs.heartbeat_event_every(),
            reap_every: runs.reap_every(),
            cancel_grace: runs.cancel_grace(),
            retention: runs.retention(),
            retention_every: runs.retention_every(),
            purge_batch: 200,
            idle_poll: Duration::from_secs(1),
            max_events_per_attempt: runs.max_events_per_attempt,
            max_event_bytes_per_attempt: runs.max_event_bytes_per_attempt,
            clock: Clock::default(),
        }
    }
}

impl EngineSettings {
    /// How long before its lease would expire an attempt that could not renew it stops itself.
    /// A tenth of the TTL: the reaper of any node requeues a run only once its lease expired,
    /// so an attempt fenced this early is gone before the next one can start.
    pub fn fence_margin(&self) -> Duration {
        self.lease_ttl / 10
    }

    /// How often attempts are checked against their lease (independent of the renewals, which
    /// may be the thing that hangs).
    pub fn fence_check_every(&self) -> Duration {
        (self.lease_ttl / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}
