//! Timers: the schedules the configuration declares (`[[agents.<name>.entrypoints.<tag>.timers]]`).
//! At start-up each is created, or changed to match, under the owner [`CONFIG_OWNER`] and its
//! name; a timer taken out of the configuration has its schedule deleted (among the agents
//! this node serves: a node serving other agents keeps its own). Several nodes
//! starting at once converge: a create that finds the name taken reads and compares instead,
//! and a change made meanwhile is read again.

use agentry_core::runs::now_ms;
use agentry_core::schedules::{Schedule, ScheduleSpec};
use agentry_core::store::ScheduleWrite;

use crate::Scheduler;

/// The owner of the configuration's schedules (an API key's id never looks like this).
pub const CONFIG_OWNER: &str = "config";
/// Reads and writes of one timer before giving up on a schedule that keeps changing.
const TRIES: usize = 5;

/// What declaring the timers did, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Declared {
    pub created: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
}

impl Declared {
    /// Whether a schedule was created, changed or deleted.
    pub fn changed_anything(&self) -> bool {
        !(self.created.is_empty() && self.changed.is_empty() && self.deleted.is_empty())
    }
}

impl Scheduler {
    /// Makes the configuration's schedules what `timers` say (each named, its agent resolved
    /// or resolvable here). An error names the timer and why.
    pub async fn declare_timers(&self, timers: &[ScheduleSpec]) -> Result<Declared, String> {
        let mut report = Declared::default();
        for timer in timers {
            let name = timer.name.clone().unwrap_or_default();
            let outcome = self
                .declare_one(timer)
                .await
                .map_err(|why| format!("timer `{name}`: {why}"))?;
            match outcome {
                Outcome::Created => report.created.push(name),
                Outcome::Changed => report.changed.push(name),
                Outcome::Unchanged => report.unchanged.push(name),
            }
        }
        let declared: Vec<&str> = timers.iter().filter_map(|t| t.name.as_deref()).collect();
        // Only the timers of agents this node serves: another node may serve other agents,
        // with timers this configuration does not know of.
        let served: Vec<String> = self
            .inner
            .engine
            .inner
            .agents
            .iter()
            .map(|a| a.config.agent_id.clone())
            .collect();
        let mut cursor = None;
        loop {
            let page = self
                .inner
                .store
                .list_schedules(cursor.clone(), Some(served.clone()), 500)
                .await
                .map_err(|e| e.to_string())?;
            for s in &page {
                let name = s.spec.name.as_deref().unwrap_or_default();
                if s.owner == CONFIG_OWNER && !declared.contains(&name) {
                    self.inner
                        .store
                        .delete_schedule(&s.id)
                        .await
                        .map_err(|e| e.to_string())?;
                    report.deleted.push(name.to_string());
                }
            }
            if page.len() < 500 {
                break;
            }
            cursor = page.last().map(|s| s.id.clone());
        }
        if report.changed_anything() {
            self.changed();
        }
        Ok(report)
    }

    async fn declare_one(&self, timer: &ScheduleSpec) -> Result<Outcome, String> {
        let zone = self.default_timezone().to_string();
        for _ in 0..TRIES {
            let now = now_ms();
            let spec = timer
                .clone()
                .prepare(now, &zone)
                .map_err(|r| format!("{}: {}", r.field, r.message))?;
            let mut fresh = Schedule::new(CONFIG_OWNER.to_string(), spec, now);
            let agent = self
                .inner
                .engine
                .inner
                .agents
                .get(&fresh.spec.agent)
                .ok_or_else(|| format!("no agent `{}` is served here", fresh.spec.agent))?;
            fresh.spec.agent = agent.config.agent_id.clone();
            self.build_run(&fresh, now)
                .map_err(|r| format!("its runs could not be built: {r}"))?;
            let when = fresh.spec.when(&zone).map_err(|r| r.message)?;
            fresh.next_fire_at = fresh.first_slot(&when, now);
            let existing_id = match self
                .inner
                .store
                .create_schedule(fresh.clone())
                .await
                .map_err(|e| e.to_string())?
            {
                ScheduleWrite::Done(_) => return Ok(Outcome::Created),
                ScheduleWrite::NameTaken(id) => id,
                ScheduleWrite::Stale | ScheduleWrite::Missing => continue,
            };
            let Some(current) = self
                .inner
                .store
                .get_schedule(&existing_id)
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            // An `every` timer without `start_at` keeps the phase it was created with.
            let mut wanted = fresh.spec.clone();
            if timer.start_at.is_none() && timer.every.is_some() {
                wanted.start_at = current.spec.start_at.clone();
            }
            if wanted == current.spec {
                return Ok(Outcome::Unchanged);
            }
            let mut changed = Schedule {
                spec: wanted,
                updated_at: now,
                ..current.clone()
            };
            let when = changed.spec.when(&zone).map_err(|r| r.message)?;
            changed.next_fire_at = changed.first_slot(&when, now);
            match self
                .inner
                .store
                .update_schedule(changed)
                .await
                .map_err(|e| e.to_string())?
            {
                ScheduleWrite::Done(_) => return Ok(Outcome::Changed),
                ScheduleWrite::NameTaken(_) | ScheduleWrite::Stale | ScheduleWrite::Missing => {
                    continue;
                }
            }
        }
        Err("its schedule kept changing while it was declared".into())
    }
}

enum Outcome {
    Created,
    Changed,
    Unchanged,
}
