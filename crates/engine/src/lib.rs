//! The run engine: turns stored runs into calls on the agents' worker pools, durably.
//!
//! * The **dispatcher** claims due runs (priority, then due time, then age) under a lease owned
//!   by this node's incarnation, within the global and per-agent caps, and starts an executor
//!   for each. It is woken at once by new runs and freed capacity, and otherwise sleeps until
//!   the next delayed run is due (at most `idle_poll`).
//! * An **executor** (`execute.rs`) runs one attempt: it hands the run to the pool, commits
//!   the run's events as they come, saves checkpoints before the agent goes on, enforces the
//!   deadline and cancellation, and ends the attempt with a fenced write (a node that lost the
//!   lease cannot complete the run).
//! * **Maintenance** (`maintenance.rs`): the heartbeat renews this node's leases; the reaper
//!   requeues runs whose node died; retention deletes old finished runs in small batches.
//!
//! The engine never holds a transaction across an agent's run: every store call is one short
//! group-committed write.

mod execute;
mod follow;
mod hub;
mod maintenance;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use agentry_core::agent::{Agents, ServedAgent};
use agentry_core::runs::{
    CancelOutcome, ClaimRequest, CreateOutcome, DirectClaim, NewRun, Run, RunEvent, now_ms,
};
use agentry_core::settings::RunsConfig;
use agentry_core::store::{RunStore, StoreError};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

pub use follow::{EventFeed, Follow};
pub use hub::{EventHub, Published, Subscription};

/// Tuning of the engine, derived from the `runs` section of the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// This node's stable name (its previous incarnation's runs are requeued at start-up).
    pub node: String,
    /// Runs executing at once on this node, all agents together.
    pub max_running: usize,
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
}

impl EngineSettings {
    /// The engine's settings for this node, from the configuration's `runs` section.
    pub fn new(node: String, runs: &RunsConfig) -> Self {
        Self {
            node,
            max_running: runs.max_running,
            lease_ttl: runs.lease_ttl(),
            heartbeat_every: runs.heartbeat_every(),
            heartbeat_event_every: runs.heartbeat_event_every(),
            reap_every: runs.reap_every(),
            cancel_grace: runs.cancel_grace(),
            retention: runs.retention(),
            retention_every: runs.retention_every(),
            purge_batch: 200,
            idle_poll: Duration::from_secs(1),
        }
    }
}

/// What an executor listens to besides its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    None,
    /// Someone asked to cancel the run.
    Cancel,
    /// The lease is gone (another node took the run, or the engine is stopping): stop without
    /// writing anything.
    Abandon,
}

struct Running {
    agent: String,
    attempt: u32,
    signal: watch::Sender<Signal>,
    last_heartbeat_event: std::time::Instant,
}

struct Inner {
    store: Arc<dyn RunStore>,
    agents: Arc<Agents>,
    /// Agent ids in a fixed order, for fair claims.
    order: Vec<String>,
    settings: EngineSettings,
    /// `node/incarnation`: the lease owner of everything this process claims.
    owner: String,
    hub: Arc<EventHub>,
    wake: Notify,
    running: Mutex<HashMap<String, Running>>,
    /// Slots held by submissions that may lease their run directly, per agent.
    reserved: Mutex<HashMap<String, usize>>,
    /// Rotates which agent claims first.
    turn: std::sync::atomic::AtomicUsize,
    stopping: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

/// The engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Why the engine refused to create a run.
#[derive(Debug)]
pub enum SubmitError {
    /// The idempotency key was used with another request; the existing run's id.
    Conflict(String),
    Store(StoreError),
}

impl Engine {
    /// Recovers this node's previous incarnation's runs, then starts the dispatcher and the
    /// maintenance loops.
    pub async fn start(
        store: Arc<dyn RunStore>,
        agents: Arc<Agents>,
        settings: EngineSettings,
    ) -> Result<Self, StoreError> {
        let owner = format!("{}/{}", settings.node, uuid::Uuid::new_v4().simple());
        let mut order: Vec<String> = agents.iter().map(|a| a.config.agent_id.clone()).collect();
        order.sort();
        let inner = Arc::new(Inner {
            store,
            agents,
            order,
            settings,
            owner,
            hub: Arc::new(EventHub::default()),
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashMap::new()),
            turn: std::sync::atomic::AtomicUsize::new(0),
            stopping: watch::channel(false).0,
            tasks: Mutex::new(JoinSet::new()),
        });
        let recovered = inner
            .store
            .recover_leases(
                now_ms(),
                Some((inner.settings.node.clone(), inner.owner.clone())),
            )
            .await?;
        if !recovered.is_empty() {
            tracing::info!(
                runs = recovered.len(),
                "requeued the runs this node was running when it stopped"
            );
        }
        for f in &recovered {
            inner.hub.publish(&f.events, Some(&f.run));
        }
        {
            let mut tasks = inner.tasks.lock();
            tasks.spawn(dispatch_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::heartbeat_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::reaper_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::retention_loop(Arc::clone(&inner)));
        }
        Ok(Self { inner })
    }

    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.inner.store
    }

    /// The agents this node serves.
    pub fn agents(&self) -> &Arc<Agents> {
        &self.inner.agents
    }

    pub fn hub(&self) -> &Arc<EventHub> {
        &self.inner.hub
    }

    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Runs executing on this node now.
    pub fn running(&self) -> usize {
        self.inner.running.lock().len()
    }

    /// Stores a run (committed when this returns). When its agent has room and nothing waits
    /// ahead of it, the same commit leases it to this node and it starts at once; otherwise the
    /// dispatcher is woken.
    pub async fn submit(&self, run: NewRun) -> Result<(Run, bool), SubmitError> {
        let reservation = self.inner.reserve(&run.agent);
        let claim = reservation.as_ref().map(|_| DirectClaim {
            node: self.inner.settings.node.clone(),
            owner: self.inner.owner.clone(),
            lease_until: now_ms() + self.inner.settings.lease_ttl.as_millis() as i64,
        });
        match self.inner.store.create_run(run, claim).await {
            Ok(CreateOutcome::Created {
                run,
                event,
                claimed,
            }) => {
                self.inner.hub.publish(std::slice::from_ref(&event), None);
                match claimed {
                    Some(claimed) => execute::start(&self.inner, claimed),
                    None => self.inner.wake.notify_one(),
                }
                drop(reservation);
                Ok((run, true))
            }
            Ok(CreateOutcome::Existing(run)) => Ok((run, false)),
            Ok(CreateOutcome::Conflict { existing_id }) => Err(SubmitError::Conflict(existing_id)),
            Err(e) => Err(SubmitError::Store(e)),
        }
    }

    /// Cancels a run: a queued one at once, a running one by signalling its executor (here) or
    /// its node (through the store, seen at that node's next heartbeat).
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self.inner.store.cancel_run(id, now_ms()).await?;
        match &outcome {
            CancelOutcome::Cancelled(f) => {
                self.inner.hub.publish(&f.events, Some(&f.run));
                self.inner.wake.notify_one();
            }
            CancelOutcome::Requested { run, event } => {
                if let Some(e) = event {
                    self.inner.hub.publish(std::slice::from_ref(e), None);
                }
                if let Some(r) = self.inner.running.lock().get(&run.id) {
                    r.signal.send_replace(Signal::Cancel);
                }
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// The run's events from `from` on, in order and each once, live until its terminal event
    /// (see `follow.rs`). Subscribes before it reads, so nothing is missed in between.
    pub async fn follow(&self, id: &str, from: Follow) -> Result<EventFeed, StoreError> {
        let sub = self.inner.hub.subscribe(id);
        EventFeed::start(Arc::clone(&self.inner.store), sub, id, from).await
    }

    /// Waits until the run is terminal or `timeout` passes; returns the run as it then stands
    /// (`None`: no such run).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Run>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut feed = self.follow(id, Follow::Now).await?;
        let Some(run) = self.inner.store.get_run(id).await? else {
            return Ok(None);
        };
        if run.status.is_terminal() {
            return Ok(Some(run));
        }
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, feed.next()).await {
            if p.event.kind.is_terminal() {
                if let Some(run) = p.run {
                    return Ok(Some((*run).clone()));
                }
                break;
            }
        }
        self.inner.store.get_run(id).await
    }

    /// Stops dispatching, lets running attempts finish within `grace`, then abandons the rest
    /// without writing: the next start of this node requeues them at once.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.send_replace(true);
        self.inner.wake.notify_one();
        let deadline = tokio::time::Instant::now() + grace;
        while self.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in self.inner.running.lock().values() {
            r.signal.send_replace(Signal::Abandon);
        }
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.running() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.tasks.lock().abort_all();
    }
}

impl Inner {
    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Holds one slot of `agent`'s capacity for a submission that may lease its run directly.
    fn reserve(self: &Arc<Self>, agent: &str) -> Option<Reservation> {
        let cap = self.agents.by_id(agent)?.max_running_runs;
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
    fn free_capacity(&self) -> Vec<(String, usize)> {
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
            let free = agent.max_running_runs.saturating_sub(used).min(global_free);
            global_free -= free;
            if free > 0 {
                out.push((name.clone(), free));
            }
        }
        out
    }

    fn publish(&self, events: &[RunEvent], run: Option<&Run>) {
        self.hub.publish(events, run);
    }
}

/// A slot held for a direct lease; released on drop.
struct Reservation {
    inner: Arc<Inner>,
    agent: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.inner.reserved.lock();
        if let Some(n) = reserved.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn dispatch_loop(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Register for wake-ups before looking, so none is lost in between.
        let woken = inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if inner.stopping() {
            return;
        }
        let per_agent = inner.free_capacity();
        let mut sleep_for = inner.settings.idle_poll;
        if !per_agent.is_empty() {
            let wanted: usize = per_agent.iter().map(|(_, n)| n).sum();
            let now = now_ms();
            let request = ClaimRequest {
                node: inner.settings.node.clone(),
                owner: inner.owner.clone(),
                now,
                lease_until: now + inner.settings.lease_ttl.as_millis() as i64,
                per_agent,
            };
            match inner.store.claim_runs(request).await {
                Ok(claimed) => {
                    backoff = Duration::from_millis(50);
                    let got = claimed.runs.len();
                    for c in claimed.runs {
                        execute::start(&inner, c);
                    }
                    if got >= wanted {
                        // Maybe more are due: look again once capacity frees up.
                        continue;
                    }
                    if let Some(due) = claimed.next_due {
                        let wait = Duration::from_millis((due - now_ms()).max(0) as u64);
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
