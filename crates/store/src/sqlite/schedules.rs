//! Schedules on SQLite. A fire is one job of the writer thread: the due schedules are read,
//! planned, their fires recorded (a slot's unique key refuses a second), their runs created and
//! the schedules moved on, in one commit. One writer means no two fires of a slot can race;
//! the unique key is the guarantee all the same.

use agentry_core::runs::{CreateOutcome, RunStatus};
use agentry_core::schedules::{
    DueSchedule, FireOutcome, NewFire, Schedule, ScheduleFire, ScheduleSpec,
};
use agentry_core::store::{
    FireBatch, Fired, SchedulePlanner, ScheduleStore, ScheduleWrite, StoreError,
};
use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{SqliteStore, ops};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn schedule_from_row(row: &Row<'_>) -> rusqlite::Result<Schedule> {
    let spec: String = row.get(4)?;
    let spec: ScheduleSpec = serde_json::from_str(&spec)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, Type::Text, Box::new(e)))?;
    Ok(Schedule {
        id: row.get(0)?,
        owner: row.get(1)?,
        spec,
        paused: row.get(5)?,
        next_fire_at: row.get(6)?,
        fires: row.get::<_, i64>(7)?.max(0) as u64,
        last_fire_at: row.get(8)?,
        last_run_id: row.get(9)?,
        version: row.get(10)?,
        created_at: row.get(11)?,
        updated_at: row.get(12)?,
    })
}

fn fire_from_row(row: &Row<'_>) -> rusqlite::Result<ScheduleFire> {
    let outcome: String = row.get(4)?;
    Ok(ScheduleFire {
        seq: row.get(0)?,
        schedule_id: row.get(1)?,
        slot: row.get(2)?,
        manual: row.get(3)?,
        outcome: FireOutcome::parse(&outcome).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                4,
                Type::Text,
                format!("unknown fire outcome {outcome}").into(),
            )
        })?,
        run_id: row.get(5)?,
        detail: row.get(6)?,
        node: row.get(7)?,
        fired_at: row.get(8)?,
    })
}

fn spec_text(s: &Schedule) -> rusqlite::Result<String> {
    serde_json::to_string(&s.spec).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
}

fn name_taken(c: &Connection, s: &Schedule) -> rusqlite::Result<Option<String>> {
    let Some(name) = &s.spec.name else {
        return Ok(None);
    };
    c.prepare_cached(sql!("find_schedule_name"))?
        .query_row(params![s.owner, name, s.id], |r| r.get(0))
        .optional()
}

fn create(c: &Connection, s: &Schedule) -> rusqlite::Result<ScheduleWrite> {
    if let Some(existing) = name_taken(c, s)? {
        return Ok(ScheduleWrite::NameTaken(existing));
    }
    c.prepare_cached(sql!("insert_schedule"))?.execute(params![
        s.id,
        s.owner,
        s.spec.name,
        s.spec.agent,
        spec_text(s)?,
        s.paused,
        s.next_fire_at,
        s.fires as i64,
        s.last_fire_at,
        s.last_run_id,
        s.version,
        s.created_at,
        s.updated_at,
    ])?;
    Ok(ScheduleWrite::Done(s.clone()))
}

fn update(c: &Connection, s: &Schedule) -> rusqlite::Result<ScheduleWrite> {
    if let Some(existing) = name_taken(c, s)? {
        return Ok(ScheduleWrite::NameTaken(existing));
    }
    let updated = c
        .prepare_cached(sql!("update_schedule"))?
        .query_row(
            params![
                s.id,
                s.spec.name,
                s.spec.agent,
                spec_text(s)?,
                s.paused,
                s.next_fire_at,
                s.fires as i64,
                s.last_fire_at,
                s.last_run_id,
                s.updated_at,
                s.version,
            ],
            schedule_from_row,
        )
        .optional()?;
    Ok(match updated {
        Some(s) => ScheduleWrite::Done(s),
        None if get(c, &s.id)?.is_some() => ScheduleWrite::Stale,
        None => ScheduleWrite::Missing,
    })
}

fn get(c: &Connection, id: &str) -> rusqlite::Result<Option<Schedule>> {
    c.prepare_cached(sql!("get_schedule"))?
        .query_row(params![id], schedule_from_row)
        .optional()
}

/// Records `fires` of `schedule` (each created run's fire only if its slot is new), creates
/// their runs, and moves the schedule to `next_fire_at`.
fn record_fires(
    c: &Connection,
    schedule: &Schedule,
    fires: Vec<NewFire>,
    next_fire_at: Option<i64>,
    node: &str,
    now: i64,
) -> rusqlite::Result<Result<Fired, StoreError>> {
    let mut out = Fired {
        schedule: schedule.clone(),
        fires: Vec::with_capacity(fires.len()),
        runs: Vec::new(),
    };
    let (mut counted, mut last_slot, mut last_run) = (0i64, None, None);
    for fire in fires {
        let run_id = fire.run.as_ref().map(|r| r.id.clone());
        let seq: Option<i64> = c
            .prepare_cached(sql!("insert_fire"))?
            .query_row(
                params![
                    schedule.id,
                    fire.slot,
                    fire.manual,
                    fire.outcome.as_str(),
                    run_id,
                    fire.detail,
                    node,
                    now
                ],
                |r| r.get(0),
            )
            .optional()?;
        let Some(seq) = seq else {
            // This slot already fired.
            continue;
        };
        if let Some(run) = &fire.run {
            match ops::create_run(c, run, None)? {
                Ok(CreateOutcome::Created { run, event, .. }) => out.runs.push((run, event)),
                Ok(_) => {
                    return Ok(Err(StoreError::Internal(
                        "a schedule's run was found existing".into(),
                    )));
                }
                Err(e) => return Ok(Err(e)),
            }
            if !fire.manual {
                counted += 1;
            }
            last_run = run_id.clone();
        }
        if !fire.manual {
            last_slot = Some(fire.slot);
        }
        out.fires.push(ScheduleFire {
            seq,
            schedule_id: schedule.id.clone(),
            slot: fire.slot,
            manual: fire.manual,
            outcome: fire.outcome,
            run_id,
            detail: fire.detail,
            node: node.to_string(),
            fired_at: now,
        });
    }
    out.schedule = c.prepare_cached(sql!("advance_schedule"))?.query_row(
        params![schedule.id, next_fire_at, counted, last_slot, last_run, now],
        schedule_from_row,
    )?;
    Ok(Ok(out))
}

fn fire_due(
    c: &Connection,
    now: i64,
    node: &str,
    agents: &str,
    limit: usize,
    planner: &SchedulePlanner,
) -> rusqlite::Result<Result<FireBatch, StoreError>> {
    let mut statement = c.prepare_cached(sql!("due_schedules"))?;
    let rows = statement.query_map(params![now, agents, limit as i64], |row| {
        let id: String = row.get(0)?;
        let status: Option<String> = row.get(13)?;
        Ok((
            id,
            schedule_from_row(row).map(|schedule| DueSchedule {
                schedule,
                last_run_status: status.as_deref().and_then(RunStatus::parse),
            }),
        ))
    })?;
    let mut due = Vec::new();
    let mut seen = 0;
    for row in rows {
        let (id, decoded) = row?;
        seen += 1;
        match decoded {
            Ok(d) => due.push(d),
            // One unreadable row must not stop every other schedule from firing.
            Err(e) => {
                tracing::warn!(schedule = %id, "cannot read a stored schedule, skipping it: {e}")
            }
        }
    }
    drop(statement);
    let more = seen >= limit;
    let mut batch = FireBatch {
        more,
        ..FireBatch::default()
    };
    for d in &due {
        let plan = planner(d, now);
        match record_fires(c, &d.schedule, plan.fires, plan.next_fire_at, node, now)? {
            Ok(fired) => batch.fired.push(fired),
            Err(e) => return Ok(Err(e)),
        }
    }
    batch.next_due = c
        .prepare_cached(sql!("next_schedule_due"))?
        .query_row(params![agents], |r| r.get(0))?;
    Ok(Ok(batch))
}

fn agents_json(agents: &[String]) -> String {
    serde_json::Value::from(agents.to_vec()).to_string()
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn create_schedule(&self, schedule: Schedule) -> Result<ScheduleWrite, StoreError> {
        self.write(move |c| create(c, &schedule).map(Ok)).await
    }

    async fn get_schedule(&self, id: &str) -> Result<Option<Schedule>, StoreError> {
        let id = id.to_string();
        self.read(move |c| get(c, &id)).await
    }

    async fn list_schedules(
        &self,
        after: Option<String>,
        agents: Option<Vec<String>>,
        limit: usize,
    ) -> Result<Vec<Schedule>, StoreError> {
        let agents = agents.as_deref().map(agents_json);
        self.read(move |c| {
            c.prepare_cached(sql!("list_schedules"))?
                .query_map(
                    params![after.unwrap_or_default(), agents, limit as i64],
                    schedule_from_row,
                )?
                .collect()
        })
        .await
    }

    async fn update_schedule(&self, schedule: Schedule) -> Result<ScheduleWrite, StoreError> {
        self.write(move |c| update(c, &schedule).map(Ok)).await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |c| {
            c.prepare_cached(sql!("delete_schedule_fires"))?
                .execute(params![id])?;
            let n = c
                .prepare_cached(sql!("delete_schedule"))?
                .execute(params![id])?;
            Ok(Ok(n > 0))
        })
        .await
    }

    async fn fire_due(
        &self,
        now: i64,
        node: &str,
        agents: Vec<String>,
        limit: usize,
        planner: SchedulePlanner,
    ) -> Result<FireBatch, StoreError> {
        let node = node.to_string();
        let agents = agents_json(&agents);
        self.write(move |c| fire_due(c, now, &node, &agents, limit.max(1), &planner))
            .await
    }

    async fn fire_manual(
        &self,
        id: &str,
        node: &str,
        fire: NewFire,
        now: i64,
    ) -> Result<Option<Fired>, StoreError> {
        let (id, node) = (id.to_string(), node.to_string());
        self.write(move |c| {
            let Some(schedule) = get(c, &id)? else {
                return Ok(Ok(None));
            };
            let next = schedule.next_fire_at;
            record_fires(c, &schedule, vec![fire.clone()], next, &node, now).map(|r| r.map(Some))
        })
        .await
    }

    async fn list_fires(
        &self,
        id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<ScheduleFire>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(sql!("list_fires"))?
                .query_map(
                    params![id, before.unwrap_or(i64::MAX), limit as i64],
                    fire_from_row,
                )?
                .collect()
        })
        .await
    }

    async fn purge_fires(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |c| {
            let n = c
                .prepare_cached(sql!("purge_fires"))?
                .execute(params![before, limit as i64])?;
            Ok(Ok(n))
        })
        .await
    }
}
