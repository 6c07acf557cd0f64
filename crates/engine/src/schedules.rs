//! The scheduler of one node: fires the due schedules of the agents this node serves, as
//! durable runs. Every node runs one; none is a leader. Each pass asks the store to fire what
//! is due (`ScheduleStore::fire_due`): the store locks the schedules it fires, skipping those
//! another node is firing, records each slot under a unique key, creates the runs and moves the
//! schedules on in one transaction, so a slot fires exactly once across nodes and restarts.
//! Between passes the loop sleeps until the earliest next slot, a change made here (the API
//! wakes it), or the poll (`schedules.poll_s`) for changes made elsewhere.

use std::sync::Arc;
use std::time::Duration;

use agentry_core::runs::{NewRun, Run, RunRejection};
use agentry_core::schedules::{
    DueSchedule, FireOutcome, FirePlan, NewFire, PlanRules, PlannedFire, Schedule, ScheduleFire,
};
use agentry_core::settings::{RunsConfig, SchedulesConfig, WorkersConfig};
use agentry_core::store::{Fired, SchedulePlanner, ScheduleStore, StoreError};
use tokio::sync::Notify;

use crate::Engine;

/// Schedules fired in one store transaction at most.
const FIRE_BATCH: usize = 500;
/// Fires older than the runs' retention are deleted this many at a time.
const PURGE_BATCH: usize = 1_000;
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Least sleep after a pass that fired nothing although something was due (another node was
/// firing it).
const BUSY_FLOOR: Duration = Duration::from_millis(50);

/// What the scheduler needs of the configuration: the runs' rules (a fire's run is built and
/// checked as `POST /v1/runs` builds one) and the schedules section.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub workers: WorkersConfig,
    pub runs: RunsConfig,
    pub schedules: SchedulesConfig,
}

/// The scheduler of this node. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    pub(crate) inner: Arc<SchedulerInner>,
}

pub(crate) struct SchedulerInner {
    pub(crate) engine: Engine,
    pub(crate) store: Arc<dyn ScheduleStore>,
    settings: SchedulerSettings,
    wake: Notify,
}

/// Why a manual fire was refused.
#[derive(Debug)]
pub enum TriggerError {
    /// The schedule's run cannot be built now (its agent or entrypoint is gone, or its input
    /// no longer fits).
    Rejected(RunRejection),
    Store(StoreError),
}

impl Scheduler {
    /// Starts this node's scheduler (unless `schedules.enabled` is off: the API still works,
    /// other nodes fire).
    pub fn start(
        engine: &Engine,
        store: Arc<dyn ScheduleStore>,
        settings: SchedulerSettings,
    ) -> Self {
        let scheduler = Self {
            inner: Arc::new(SchedulerInner {
                engine: engine.clone(),
                store,
                settings,
                wake: Notify::new(),
            }),
        };
        if scheduler.inner.settings.schedules.enabled {
            let s = scheduler.clone();
            engine
                .inner
                .tasks
                .lock()
                .spawn(async move { s.fire_loop().await });
        }
        scheduler
    }

    pub fn store(&self) -> &Arc<dyn ScheduleStore> {
        &self.inner.store
    }

    /// The rules a schedule's slots follow here.
    pub fn rules(&self) -> PlanRules<'_> {
        let s = &self.inner.settings.schedules;
        PlanRules {
            default_zone: &s.default_timezone,
            missed_after_ms: s.missed_after_ms(),
        }
    }

    pub fn default_timezone(&self) -> &str {
        &self.inner.settings.schedules.default_timezone
    }

    /// A schedule was created or changed here: look again now.
    pub fn changed(&self) {
        self.inner.wake.notify_one();
    }

    /// Builds the run a fire of `schedule` creates at `now` (checked as `POST /v1/runs` checks
    /// a run): what creating or changing a schedule checks, and what each fire does.
    pub fn build_run(&self, schedule: &Schedule, now: i64) -> Result<NewRun, RunRejection> {
        build_run(
            &self.inner.engine.inner.agents,
            &self.inner.settings,
            schedule,
            now,
        )
    }

    /// Fires `schedule` (as the caller read it) now, outside its timing
    /// (`POST /v1/schedules/{id}/trigger`): a run, recorded as a manual fire. `None`: the
    /// schedule was deleted meanwhile.
    pub async fn trigger(
        &self,
        schedule: &Schedule,
    ) -> Result<Option<(Run, ScheduleFire)>, TriggerError> {
        let store = &self.inner.store;
        let id = schedule.id.as_str();
        let now = self.inner.engine.inner.settings.clock.now_ms();
        let run = self
            .build_run(schedule, now)
            .map_err(TriggerError::Rejected)?;
        let fire = NewFire {
            slot: now,
            manual: true,
            outcome: FireOutcome::Created,
            run: Some(run),
            detail: None,
        };
        let node = self.inner.engine.node_name().to_string();
        let Some(fired) = store
            .fire_manual(id, &node, fire, now)
            .await
            .map_err(TriggerError::Store)?
        else {
            return Ok(None);
        };
        self.adopt(std::slice::from_ref(&fired));
        let run = fired.runs.into_iter().next().map(|(run, _)| run);
        let fire = fired.fires.into_iter().next();
        Ok(run.zip(fire))
    }

    /// Hands the runs just created to the engine: their `run.queued` events to followers, and
    /// a wake-up to the dispatcher.
    fn adopt(&self, fired: &[Fired]) {
        let inner = &self.inner.engine.inner;
        let mut any = false;
        for f in fired {
            for (_, event) in &f.runs {
                inner.hub.publish(std::slice::from_ref(event), None);
                any = true;
            }
        }
        if any {
            inner.runs_may_be_due();
        }
    }

    fn planner(&self) -> SchedulePlanner {
        let agents = Arc::clone(&self.inner.engine.inner.agents);
        let settings = self.inner.settings.clone();
        Arc::new(move |due: &DueSchedule, now: i64| plan(&agents, &settings, due, now))
    }

    async fn fire_loop(self) {
        let engine = &self.inner.engine.inner;
        let mut stopping = engine.stopping.subscribe();
        let agents = engine.order.clone();
        let node = engine.settings.node.clone();
        let planner = self.planner();
        let poll = self.inner.settings.schedules.poll();
        let retention = engine.settings.retention;
        let mut next_purge = tokio::time::Instant::now() + PURGE_EVERY;
        loop {
            if engine.stopping() {
                break;
            }
            let now = engine.settings.clock.now_ms();
            let mut sleep = poll;
            match self
                .inner
                .store
                .fire_due(now, &node, agents.clone(), FIRE_BATCH, Arc::clone(&planner))
                .await
            {
                Ok(batch) => {
                    self.adopt(&batch.fired);
                    let fires: usize = batch.fired.iter().map(|f| f.fires.len()).sum();
                    if fires > 0 {
                        tracing::debug!(schedules = batch.fired.len(), fires, "schedules fired");
                    }
                    if batch.more && !batch.fired.is_empty() {
                        continue;
                    }
                    if let Some(next) = batch.next_due {
                        let left = next - engine.settings.clock.now_ms();
                        sleep = sleep.min(Duration::from_millis(left.max(0) as u64));
                    }
                    if batch.fired.is_empty() && batch.next_due.is_some_and(|n| n <= now) {
                        // Due but not ours to fire now (another node holds it): look again
                        // soon, without spinning.
                        sleep = sleep.max(BUSY_FLOOR);
                    }
                }
                Err(e) => tracing::warn!("cannot fire due schedules: {e}; trying again"),
            }
            if let Some(retention) = retention
                && tokio::time::Instant::now() >= next_purge
            {
                next_purge = tokio::time::Instant::now() + PURGE_EVERY;
                let before = now - retention.as_millis() as i64;
                if let Err(e) = self.inner.store.purge_fires(before, PURGE_BATCH).await {
                    tracing::warn!("cannot delete old schedule fires: {e}");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.inner.wake.notified() => {}
                _ = stopping.changed() => {}
            }
        }
    }
}

fn build_run(
    agents: &agentry_core::agent::Agents,
    settings: &SchedulerSettings,
    schedule: &Schedule,
    now: i64,
) -> Result<NewRun, RunRejection> {
    let (input, metadata) = schedule.run_texts();
    NewRun::build(
        &schedule.run_request(&input, &metadata),
        agents,
        &settings.workers,
        &settings.runs,
        now,
    )
}

/// A due schedule's fires: its slots by its rules, each with its run (or why none could be
/// built: such a fire is recorded as refused, and the schedule goes on).
fn plan(
    agents: &agentry_core::agent::Agents,
    settings: &SchedulerSettings,
    due: &DueSchedule,
    now: i64,
) -> FirePlan {
    let rules = PlanRules {
        default_zone: &settings.schedules.default_timezone,
        missed_after_ms: settings.schedules.missed_after_ms(),
    };
    let schedule = &due.schedule;
    let plan = schedule.plan(now, due.previous_unfinished(), &rules);
    if plan.missed > 0 {
        tracing::info!(
            schedule = %schedule.id,
            missed = plan.missed,
            policy = ?schedule.spec.missed,
            "slots of a schedule were missed while no node could fire them"
        );
    }
    let fires: Vec<NewFire> = plan
        .fires
        .iter()
        .map(|fire| match fire {
            PlannedFire::Create(slot) => match build_run(agents, settings, schedule, now) {
                Ok(run) => NewFire {
                    slot: *slot,
                    manual: false,
                    outcome: FireOutcome::Created,
                    run: Some(run),
                    detail: None,
                },
                Err(rejection) => NewFire {
                    slot: *slot,
                    manual: false,
                    outcome: FireOutcome::Refused,
                    run: None,
                    detail: Some(rejection.to_string()),
                },
            },
            PlannedFire::SkipOverlap(slot) => NewFire {
                slot: *slot,
                manual: false,
                outcome: FireOutcome::SkippedOverlap,
                run: None,
                detail: Some("the previous fire's run had not finished".into()),
            },
        })
        .collect();
    // A refused fire is not a fire: the schedule's `max_fires` counts runs created.
    let mut next_fire_at = plan.next_fire_at;
    let refused = fires
        .iter()
        .filter(|f: &&NewFire| f.outcome == FireOutcome::Refused)
        .count();
    if refused > 0
        && schedule.spec.max_fires.is_some()
        && let Ok(when) = schedule.spec.when(&settings.schedules.default_timezone)
    {
        let created = fires
            .iter()
            .filter(|f: &&NewFire| f.outcome == FireOutcome::Created)
            .count() as u64;
        next_fire_at = schedule.slot_after(&when, now, schedule.fires + created);
    }
    FirePlan {
        fires,
        next_fire_at,
    }
}
