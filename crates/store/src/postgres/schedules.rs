//! Schedules on PostgreSQL, fired by every node at once. A node's fire is one transaction: it
//! locks the due schedules `FOR UPDATE SKIP LOCKED` (a schedule another node is firing is left
//! to it), plans them, records the fires (the unique (schedule, slot) key refuses a slot fired
//! already, whatever happened before), creates the fires' runs and moves the schedules on, in
//! four statements whatever the number of schedules. A node killed before its commit fired
//! nothing; after it, everything.

use std::collections::HashMap;

use agentry_core::runs::{CreateOutcome, Run, RunEvent, RunStatus};
use agentry_core::schedules::{
    DueSchedule, FireOutcome, NewFire, Schedule, ScheduleFire, ScheduleSpec,
};
use agentry_core::store::{
    FireBatch, Fired, SchedulePlanner, ScheduleStore, ScheduleWrite, StoreError,
};
use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::PgStore;
use super::runs::{CreateRequest, db_err, insert_runs, is_unique_violation};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn decode(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("a stored schedule is unreadable: {e}"))
}

fn schedule_from_row(row: &PgRow) -> Result<Schedule, StoreError> {
    let spec: String = row.try_get(4).map_err(db_err)?;
    let spec: ScheduleSpec = serde_json::from_str(&spec).map_err(decode)?;
    let get = |e: sqlx::Error| db_err(e);
    Ok(Schedule {
        id: row.try_get(0).map_err(get)?,
        owner: row.try_get(1).map_err(get)?,
        spec,
        paused: row.try_get(5).map_err(get)?,
        next_fire_at: row.try_get(6).map_err(get)?,
        fires: row.try_get::<i64, _>(7).map_err(get)?.max(0) as u64,
        last_fire_at: row.try_get(8).map_err(get)?,
        last_run_id: row.try_get(9).map_err(get)?,
        version: row.try_get(10).map_err(get)?,
        created_at: row.try_get(11).map_err(get)?,
        updated_at: row.try_get(12).map_err(get)?,
    })
}

fn fire_from_row(row: &PgRow) -> Result<ScheduleFire, StoreError> {
    let outcome: String = row.try_get(4).map_err(db_err)?;
    Ok(ScheduleFire {
        seq: row.try_get(0).map_err(db_err)?,
        schedule_id: row.try_get(1).map_err(db_err)?,
        slot: row.try_get(2).map_err(db_err)?,
        manual: row.try_get(3).map_err(db_err)?,
        outcome: FireOutcome::parse(&outcome)
            .ok_or_else(|| decode(format!("unknown fire outcome {outcome}")))?,
        run_id: row.try_get(5).map_err(db_err)?,
        detail: row.try_get(6).map_err(db_err)?,
        node: row.try_get(7).map_err(db_err)?,
        fired_at: row.try_get(8).map_err(db_err)?,
    })
}

fn spec_text(s: &Schedule) -> Result<String, StoreError> {
    serde_json::to_string(&s.spec).map_err(decode)
}

async fn name_taken(c: &mut PgConnection, s: &Schedule) -> Result<Option<String>, StoreError> {
    let Some(name) = &s.spec.name else {
        return Ok(None);
    };
    sqlx::query_scalar(sql!("find_schedule_name"))
        .bind(&s.owner)
        .bind(name)
        .bind(&s.id)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)
}

async fn get(c: &mut PgConnection, id: &str) -> Result<Option<Schedule>, StoreError> {
    sqlx::query(sql!("get_schedule"))
        .bind(id)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(schedule_from_row)
        .transpose()
}

/// One schedule's fires, as the batch statements take them.
struct Planned<'a> {
    schedule: &'a Schedule,
    fires: Vec<NewFire>,
    next_fire_at: Option<i64>,
}

/// Records the fires of `planned` (a slot fired already is dropped with its run), creates the
/// runs of the fires recorded, and moves each schedule on: four statements in `c`'s
/// transaction.
async fn record_fires(
    c: &mut PgConnection,
    planned: Vec<Planned<'_>>,
    node: &str,
    now: i64,
) -> Result<Vec<Fired>, StoreError> {
    let all: Vec<(&Schedule, &NewFire)> = planned
        .iter()
        .flat_map(|p| p.fires.iter().map(move |f| (p.schedule, f)))
        .collect();
    let mut stored: HashMap<(String, i64, Option<String>), i64> = HashMap::new();
    if !all.is_empty() {
        let rows = sqlx::query(sql!("insert_fires"))
            .bind(all.iter().map(|(s, _)| s.id.as_str()).collect::<Vec<_>>())
            .bind(all.iter().map(|(_, f)| f.slot).collect::<Vec<_>>())
            .bind(all.iter().map(|(_, f)| f.manual).collect::<Vec<_>>())
            .bind(
                all.iter()
                    .map(|(_, f)| f.outcome.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                all.iter()
                    .map(|(_, f)| f.run.as_ref().map(|r| r.id.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                all.iter()
                    .map(|(_, f)| f.detail.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(all.iter().map(|_| node).collect::<Vec<_>>())
            .bind(all.iter().map(|_| now).collect::<Vec<_>>())
            .fetch_all(&mut *c)
            .await
            .map_err(db_err)?;
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(db_err)?;
            let id: String = row.try_get(1).map_err(db_err)?;
            let slot: i64 = row.try_get(2).map_err(db_err)?;
            let run: Option<String> = row.try_get(3).map_err(db_err)?;
            stored.insert((id, slot, run), seq);
        }
    }
    let key =
        |s: &Schedule, f: &NewFire| (s.id.clone(), f.slot, f.run.as_ref().map(|r| r.id.clone()));
    let creates: Vec<CreateRequest> = planned
        .iter()
        .flat_map(|p| p.fires.iter().map(move |f| (p.schedule, f)))
        .filter(|(s, f)| stored.contains_key(&key(s, f)))
        .filter_map(|(_, f)| f.run.clone().map(|run| CreateRequest { run, claim: None }))
        .collect();
    let mut runs: HashMap<String, (Run, RunEvent)> = HashMap::new();
    if !creates.is_empty() {
        let created = insert_runs(&mut *c, &creates).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Internal("a schedule's run exists already".into())
            } else {
                db_err(e)
            }
        })?;
        for outcome in created {
            if let CreateOutcome::Created { run, event, .. } = outcome? {
                runs.insert(run.id.clone(), (run, event));
            }
        }
    }
    let mut out = Vec::with_capacity(planned.len());
    let (mut ids, mut nexts, mut counted, mut last_slots, mut last_runs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in planned {
        let mut fired = Fired {
            schedule: p.schedule.clone(),
            fires: Vec::new(),
            runs: Vec::new(),
        };
        let (mut n, mut last_slot, mut last_run) = (0i64, None, None);
        for f in p.fires {
            let Some(seq) = stored.get(&key(p.schedule, &f)).copied() else {
                continue;
            };
            let run_id = f.run.as_ref().map(|r| r.id.clone());
            if let Some(id) = &run_id
                && let Some(created) = runs.remove(id)
            {
                fired.runs.push(created);
                if !f.manual {
                    n += 1;
                }
                last_run = Some(id.clone());
            }
            if !f.manual {
                last_slot = Some(f.slot);
            }
            fired.fires.push(ScheduleFire {
                seq,
                schedule_id: p.schedule.id.clone(),
                slot: f.slot,
                manual: f.manual,
                outcome: f.outcome,
                run_id,
                detail: f.detail,
                node: node.to_string(),
                fired_at: now,
            });
        }
        ids.push(p.schedule.id.clone());
        nexts.push(p.next_fire_at);
        counted.push(n);
        last_slots.push(last_slot);
        last_runs.push(last_run);
        out.push(fired);
    }
    let rows = sqlx::query(sql!("advance_schedules"))
        .bind(&ids)
        .bind(&nexts)
        .bind(&counted)
        .bind(&last_slots)
        .bind(&last_runs)
        .bind(now)
        .fetch_all(&mut *c)
        .await
        .map_err(db_err)?;
    let mut advanced: HashMap<String, Schedule> = HashMap::new();
    for row in &rows {
        let s = schedule_from_row(row)?;
        advanced.insert(s.id.clone(), s);
    }
    for fired in &mut out {
        if let Some(s) = advanced.remove(&fired.schedule.id) {
            fired.schedule = s;
        }
    }
    Ok(out)
}

impl PgStore {
    /// Creates (`creating`) or replaces a schedule, its name checked first.
    async fn write_schedule(
        &self,
        s: Schedule,
        creating: bool,
    ) -> Result<ScheduleWrite, StoreError> {
        let spec = spec_text(&s)?;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        if let Some(existing) = name_taken(&mut tx, &s).await? {
            return Ok(ScheduleWrite::NameTaken(existing));
        }
        let query = if creating {
            sqlx::query(sql!("insert_schedule"))
                .bind(&s.id)
                .bind(&s.owner)
                .bind(&s.spec.name)
                .bind(&s.spec.agent)
                .bind(&spec)
                .bind(s.paused)
                .bind(s.next_fire_at)
                .bind(s.fires as i64)
                .bind(s.last_fire_at)
                .bind(&s.last_run_id)
                .bind(s.version)
                .bind(s.created_at)
                .bind(s.updated_at)
        } else {
            sqlx::query(sql!("update_schedule"))
                .bind(&s.id)
                .bind(&s.spec.name)
                .bind(&s.spec.agent)
                .bind(&spec)
                .bind(s.paused)
                .bind(s.next_fire_at)
                .bind(s.fires as i64)
                .bind(s.last_fire_at)
                .bind(&s.last_run_id)
                .bind(s.updated_at)
                .bind(s.version)
        };
        let written = match query.fetch_optional(&mut *tx).await {
            Ok(row) => row,
            // Another node took the name between the check and the write.
            Err(e) if is_unique_violation(&e) => {
                let _ = tx.rollback().await;
                let mut c = self.pool.acquire().await.map_err(db_err)?;
                return Ok(match name_taken(&mut c, &s).await? {
                    Some(existing) => ScheduleWrite::NameTaken(existing),
                    None => ScheduleWrite::Stale,
                });
            }
            Err(e) => return Err(db_err(e)),
        };
        let outcome = match (creating, written) {
            (true, _) => ScheduleWrite::Done(s.clone()),
            (false, Some(row)) => ScheduleWrite::Done(schedule_from_row(&row)?),
            (false, None) if get(&mut tx, &s.id).await?.is_some() => ScheduleWrite::Stale,
            (false, None) => ScheduleWrite::Missing,
        };
        tx.commit().await.map_err(db_err)?;
        Ok(outcome)
    }

    /// Tells the other nodes that runs were queued (they claim them at once).
    fn announce(&self, fired: &[Fired]) {
        if fired.iter().any(|f| !f.runs.is_empty()) {
            self.notifier.runs_due();
        }
    }
}

#[async_trait]
impl ScheduleStore for PgStore {
    async fn create_schedule(&self, schedule: Schedule) -> Result<ScheduleWrite, StoreError> {
        self.write_schedule(schedule, true).await
    }

    async fn get_schedule(&self, id: &str) -> Result<Option<Schedule>, StoreError> {
        let mut c = self.pool.acquire().await.map_err(db_err)?;
        get(&mut c, id).await
    }

    async fn list_schedules(
        &self,
        after: Option<String>,
        agents: Option<Vec<String>>,
        limit: usize,
    ) -> Result<Vec<Schedule>, StoreError> {
        sqlx::query(sql!("list_schedules"))
            .bind(after.unwrap_or_default())
            .bind(agents)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(schedule_from_row)
            .collect()
    }

    async fn update_schedule(&self, schedule: Schedule) -> Result<ScheduleWrite, StoreError> {
        self.write_schedule(schedule, false).await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(sql!("delete_schedule"))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn fire_due(
        &self,
        now: i64,
        node: &str,
        agents: Vec<String>,
        limit: usize,
        planner: SchedulePlanner,
    ) -> Result<FireBatch, StoreError> {
        let limit = limit.max(1);
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let rows = sqlx::query(sql!("due_schedules"))
            .bind(now)
            .bind(&agents)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let more = rows.len() >= limit;
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let status: Option<String> = row.try_get(13).map_err(db_err)?;
            match schedule_from_row(row) {
                Ok(schedule) => due.push(DueSchedule {
                    schedule,
                    last_run_status: status.as_deref().and_then(RunStatus::parse),
                }),
                // One unreadable row must not stop every other schedule from firing.
                Err(e) => {
                    let id: String = row.try_get(0).unwrap_or_default();
                    tracing::warn!(schedule = %id, "cannot read a stored schedule, skipping it: {e}");
                }
            }
        }
        let fired = if due.is_empty() {
            let _ = tx.rollback().await;
            Vec::new()
        } else {
            let planned = due
                .iter()
                .map(|d| {
                    let plan = planner(d, now);
                    Planned {
                        schedule: &d.schedule,
                        fires: plan.fires,
                        next_fire_at: plan.next_fire_at,
                    }
                })
                .collect();
            let fired = record_fires(&mut tx, planned, node, now).await?;
            tx.commit().await.map_err(db_err)?;
            self.announce(&fired);
            fired
        };
        let next_due: Option<i64> = sqlx::query_scalar(sql!("next_schedule_due"))
            .bind(&agents)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(FireBatch {
            fired,
            next_due,
            more,
        })
    }

    async fn fire_manual(
        &self,
        id: &str,
        node: &str,
        fire: NewFire,
        now: i64,
    ) -> Result<Option<Fired>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let Some(row) = sqlx::query(sql!("lock_schedule"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let schedule = schedule_from_row(&row)?;
        let next_fire_at = schedule.next_fire_at;
        let planned = vec![Planned {
            schedule: &schedule,
            fires: vec![fire],
            next_fire_at,
        }];
        let mut fired = record_fires(&mut tx, planned, node, now).await?;
        tx.commit().await.map_err(db_err)?;
        self.announce(&fired);
        Ok(fired.pop())
    }

    async fn list_fires(
        &self,
        id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<ScheduleFire>, StoreError> {
        sqlx::query(sql!("list_fires"))
            .bind(id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(fire_from_row)
            .collect()
    }

    async fn purge_fires(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let done = sqlx::query(sql!("purge_fires"))
            .bind(before)
            .bind(limit as i64)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() as usize)
    }
}
