//! The run engine: turns stored runs into calls on the agents' executors, durably. It knows
//! agents only through `AgentExecutor` and the store only through `RunStore`.
//!
//! * The **dispatcher** (`dispatch.rs`) claims due runs (priority, then due time, then age)
//!   under a lease owned by this node's incarnation, within the global and per-agent caps, and
//!   starts an attempt for each.
//! * An **attempt** (`execute.rs`) hands the run to its agent's executor, commits the run's
//!   events as they come, saves checkpoints before the agent goes on, enforces cancellation,
//!   and ends with a fenced write (a node that lost the lease cannot complete the run).
//! * **Maintenance** (`maintenance.rs`): the heartbeat renews this node's leases; the reaper
//!   requeues runs whose node died; retention deletes old finished runs in small batches.
//! * **Following** (`follow.rs`): the one gap-free feed of a run's events, over the live hub
//!   (`hub.rs`) and the store.
//! * What the tasks share is in `state.rs`; the tuning in `settings.rs`.
//!
//! The engine never holds a transaction across an agent's run: every store call is one short
//! group-committed write.

mod callbacks;
mod dispatch;
mod execute;
mod follow;
mod hub;
mod maintenance;
pub mod metrics;
mod schedules;
mod settings;
mod state;
mod timers;
mod triggers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use agentry_core::agent::{Agents, ServedAgent};
use agentry_core::nodes::{NodeRecord, NodeStatus};
use agentry_core::runs::{CancelOutcome, CreateOutcome, DirectClaim, NewRun, Run};
use agentry_core::store::{RunStore, StoreError};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

pub use callbacks::{CallbackSettings, start_deliverer};
pub use follow::{EventFeed, Follow};
pub use hub::{EventHub, Published, Subscription};
pub use schedules::{Scheduler, SchedulerSettings, TriggerError};
pub use settings::EngineSettings;
use state::{Abandon, Inner};
pub use timers::{CONFIG_OWNER, Declared};
pub use triggers::{TriggerSettings, start_triggers};

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
            entrypoint_caps: entrypoint_caps(&agents),
            agents,
            order,
            settings,
            owner,
            hub: Arc::new(EventHub::default()),
            wake: Notify::new(),
            runs_hinted: std::sync::atomic::AtomicBool::new(true),
            running: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashMap::new()),
            turn: std::sync::atomic::AtomicUsize::new(0),
            stopping: watch::channel(false).0,
            tasks: Mutex::new(JoinSet::new()),
            started_at: agentry_core::runs::now_ms(),
            counters: Default::default(),
            name_lost: Default::default(),
        });
        // Before anything of this node's previous life is requeued: a live process under the
        // same name would lose its runs.
        let gone_after = inner.settings.lease_ttl.as_millis() as i64;
        if !inner
            .store
            .register_node(&inner.node_report(), gone_after)
            .await?
        {
            return Err(StoreError::Internal(agentry_core::nodes::name_in_use(
                &inner.settings.node,
            )));
        }
        let recovered = inner
            .store
            .recover_leases(
                inner.settings.clock.now_ms(),
                Some((inner.settings.node.clone(), inner.owner.clone())),
                Vec::new(),
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
            tasks.spawn(dispatch::dispatch_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::heartbeat_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::fence_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::reaper_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::retention_loop(Arc::clone(&inner)));
            tasks.spawn(maintenance::node_report_loop(Arc::clone(&inner)));
            if let Some(changes) = inner.store.changes() {
                tasks.spawn(maintenance::follow_other_nodes(Arc::clone(&inner), changes));
            }
        }
        Ok(Self { inner })
    }

    /// What this engine has counted so far (`/metrics`).
    pub fn counters(&self) -> metrics::CountersSnapshot {
        self.inner.counters.snapshot()
    }

    /// Runs this node may hold at once, all agents together.
    pub fn capacity(&self) -> usize {
        self.inner.settings.max_running
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.settings.node
    }

    /// What this node does (`serve` or `worker`).
    pub fn role(&self) -> agentry_core::nodes::NodeRole {
        self.inner.settings.role
    }

    /// Whether the run store answers within a second (readiness: a node whose database is
    /// away cannot take runs).
    pub async fn store_reachable(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.inner.store.ping()).await,
            Ok(Ok(()))
        )
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
    /// dispatcher is woken. The store's work and what must follow its commit (starting a run
    /// leased here, the wake-ups) run to the end even if the caller goes away meanwhile (its
    /// client disconnected): a run committed as leased to this node and never started would
    /// sit until its lease expired.
    pub async fn submit(&self, run: NewRun) -> Result<(Run, bool), SubmitError> {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move { submit_now(&inner, run).await })
            .await
            .map_err(|e| {
                SubmitError::Store(StoreError::Internal(format!("a submission failed: {e}")))
            })?
    }

    /// Cancels a run: a queued one at once, a running one by signalling its executor (here) or
    /// its node (through the store, seen at that node's next heartbeat).
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self
            .inner
            .store
            .cancel_run(id, self.inner.settings.clock.now_ms())
            .await?;
        match &outcome {
            CancelOutcome::Cancelled(f) => {
                self.inner.hub.publish(&f.events, Some(&f.run));
                // It may have held up the next run of its concurrency key.
                self.inner.runs_may_be_due();
            }
            CancelOutcome::Requested { run, event } => {
                if let Some(e) = event {
                    self.inner.hub.publish(std::slice::from_ref(e), None);
                }
                for (_, r) in self
                    .inner
                    .running
                    .lock()
                    .iter()
                    .filter(|(k, _)| k.run_id == run.id)
                {
                    r.cancel();
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

    /// Waits until the run is terminal or `timeout` passes; returns the run as it then stands.
    /// `None`: no such run, or `allow` refused it (seen as it was when the wait began), so a
    /// caller never waits on a run it may not see.
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
        allow: impl FnOnce(&Run) -> bool,
    ) -> Result<Option<Run>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Most waits are for runs already over: one read answers them.
        let Some(run) = self.inner.store.get_run(id).await? else {
            return Ok(None);
        };
        if !allow(&run) {
            return Ok(None);
        }
        if run.status.is_terminal() {
            return Ok(Some(run));
        }
        // Still going: follow from here on, then look again, since the run may have ended
        // between the first read and the feed's start (its end would then be behind the feed).
        let feed = self.follow(id, Follow::Now).await?;
        match self.inner.store.get_run(id).await? {
            Some(run) if run.status.is_terminal() => return Ok(Some(run)),
            None => return Ok(None),
            Some(_) => {}
        }
        self.follow_to_end(feed, deadline, id).await
    }

    /// Creates a run and waits until it is terminal or `timeout` passes: the run as it then
    /// stands, and whether it was created (false: an idempotency key found an earlier one).
    /// A new run's feed is subscribed before the run exists, so no read of the store is
    /// needed to follow it: every event after its creation arrives live (or, should the live
    /// feed skip, is read back by the feed).
    pub async fn submit_and_wait(
        &self,
        run: NewRun,
        timeout: Duration,
    ) -> Result<(Run, bool), SubmitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let sub = self.inner.hub.subscribe(&run.id);
        let id = run.id.clone();
        let (created, is_new) = self.submit(run).await?;
        if !is_new || created.id != id {
            drop(sub);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let run = self
                .wait(&created.id, left, |_| true)
                .await
                .map_err(SubmitError::Store)?
                .unwrap_or(created);
            return Ok((run, is_new));
        }
        // Its first event, `run.queued`, is number 1; what follows is live.
        let feed = EventFeed::live(Arc::clone(&self.inner.store), sub, &id, 1);
        let run = self
            .follow_to_end(feed, deadline, &id)
            .await
            .map_err(SubmitError::Store)?
            .unwrap_or(created);
        Ok((run, true))
    }

    /// Reads `feed` until the run's terminal event (the run as it ended) or the deadline (the
    /// run as it then stands, read from the store).
    async fn follow_to_end(
        &self,
        mut feed: EventFeed,
        deadline: tokio::time::Instant,
        id: &str,
    ) -> Result<Option<Run>, StoreError> {
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

    /// Stops dispatching, lets running attempts finish within `grace`, abandons the rest, and
    /// hands them back to the queue at once (other nodes take them without waiting for the
    /// lease TTL).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.send_replace(true);
        self.inner.wake.notify_one();
        let deadline = tokio::time::Instant::now() + grace;
        while self.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in self.inner.running.lock().values() {
            r.abandon(Abandon::Stopping);
        }
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.running() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.tasks.lock().abort_all();
        self.hand_back().await;
        let stopped = self
            .inner
            .store
            .node_stopped(&self.inner.settings.node, &self.inner.owner);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), stopped).await {
            tracing::warn!("could not mark this node stopped: {e}");
        }
    }

    /// The nodes sharing this store, or this node alone when its store is its own.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let gone_after = self.inner.settings.lease_ttl.as_millis() as i64;
        if let Some(nodes) = self.inner.store.list_nodes(gone_after).await? {
            return Ok(nodes);
        }
        let now = self.inner.settings.clock.now_ms();
        Ok(vec![NodeRecord {
            report: self.inner.node_report(),
            started_at: self.inner.started_at,
            last_seen_at: now,
            status: if self.inner.stopping() {
                NodeStatus::Stopped
            } else {
                NodeStatus::Up
            },
        }])
    }

    /// Requeues at once what this node still holds (attempts stopped by the shutdown, runs
    /// leased but not started), so other nodes take them now rather than after the lease TTL.
    /// Every attempt of this node is stopped by now, so none of its leases is live: handing
    /// them all back is what the next start of this node would do. If the store cannot be
    /// reached, the leases expire and the reapers take them.
    async fn hand_back(&self) {
        if self
            .inner
            .name_lost
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "not handing runs back: another process holds this node's name; this one's leases expire"
            );
            return;
        }
        let not_an_owner = format!("{}/stopped", self.inner.owner);
        let node = Some((self.inner.settings.node.clone(), not_an_owner));
        let now = self.inner.settings.clock.now_ms();
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.inner.store.recover_leases(now, node, Vec::new()),
        )
        .await
        {
            Ok(Ok(handed)) => {
                if !handed.is_empty() {
                    tracing::info!(
                        runs = handed.len(),
                        "handed unfinished runs back to the queue"
                    );
                }
                for f in &handed {
                    self.inner.hub.publish(&f.events, Some(&f.run));
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("could not hand unfinished runs back: {e}; their leases will expire")
            }
            Err(_) => {
                tracing::warn!("handing unfinished runs back timed out; their leases will expire")
            }
        }
    }
}

/// Every served entrypoint's `max_concurrency`.
fn entrypoint_caps(agents: &Agents) -> Vec<agentry_core::runs::EntrypointCap> {
    agents
        .iter()
        .flat_map(|a| {
            a.config.entrypoints.iter().filter_map(|e| {
                e.max_concurrency
                    .map(|max| agentry_core::runs::EntrypointCap {
                        agent: a.config.agent_id.clone(),
                        entrypoint: e.tag.clone(),
                        max,
                    })
            })
        })
        .collect()
}

/// See [`Engine::submit`].
async fn submit_now(inner: &Arc<Inner>, run: NewRun) -> Result<(Run, bool), SubmitError> {
    // A run of a capped entrypoint waits for a claim, which counts what runs.
    let capped = inner
        .entrypoint_caps
        .iter()
        .any(|c| c.agent == run.agent && c.entrypoint == run.entrypoint);
    let reservation = if capped {
        None
    } else {
        inner.reserve(&run.agent)
    };
    let asked_at = std::time::Instant::now();
    let claim = reservation.as_ref().map(|_| DirectClaim {
        node: inner.settings.node.clone(),
        owner: inner.owner.clone(),
        lease_until: inner.settings.clock.now_ms() + inner.settings.lease_ttl.as_millis() as i64,
    });
    match inner.store.create_run(run, claim).await {
        Ok(CreateOutcome::Created {
            run,
            event,
            claimed,
        }) => {
            inner.hub.publish(std::slice::from_ref(&event), None);
            // The slot is released first, so the dispatcher the hint wakes sees the room.
            drop(reservation);
            match claimed {
                Some(claimed) => execute::start(inner, claimed, asked_at),
                None => inner.runs_may_be_due(),
            }
            Ok((run, true))
        }
        Ok(CreateOutcome::Existing(run)) => Ok((run, false)),
        Ok(CreateOutcome::Conflict { existing_id }) => Err(SubmitError::Conflict(existing_id)),
        Err(e) => Err(SubmitError::Store(e)),
    }
}
