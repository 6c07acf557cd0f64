//! The store's operations as SQLite statements. Write operations run on the writer thread inside
//! a savepoint (see `mod.rs`); an inner `Err(StoreError)` is a refusal that rolls the job back.

use agentry_core::keys::ApiKey;
use agentry_core::runs::{
    AttemptStart, Backoff, CancelOutcome, ClaimRequest, Claimed, ClaimedRun, CreateOutcome,
    DirectClaim, EventKind, Finished, LeaseRef, NewEvent, NewRun, Outcome, Renewal, Run, RunEvent,
    RunQuery, RunStatus,
};
use agentry_core::store::StoreError;
use rusqlite::types::Type;

use crate::transitions::{
    CANCELLED_BEFORE_START, LostAttempt, checkpoint_event_data, queued_event_data,
    started_event_data, transition,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn conversion(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, msg.into())
}

/// The run columns, in the order every query that returns runs names them (`RETURNING …` and
/// `SELECT …` of `queries/*.sql`). Rows are read by these names; the names are turned into
/// positions when this is compiled (`col`), and `every_run_query_names_the_run_columns` checks
/// each query's columns against this list by name, so a query that names them otherwise
/// fails a test instead of misreading a row. (Looking names up per row costs ~20 µs a row.)
const RUN_COLUMNS: [&str; 25] = [
    "seq",
    "id",
    "agent",
    "entrypoint",
    "input",
    "status",
    "attempt",
    "max_attempts",
    "lease_losses",
    "priority",
    "run_at",
    "timeout_ms",
    "backoff",
    "concurrency_key",
    "idempotency_key",
    "metadata",
    "result",
    "error",
    "cancel_requested",
    "lease_owner",
    "lease_expires_at",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
];

/// The position of a run column, by its name (at compile time; an unknown name does not
/// compile).
const fn col(name: &str) -> usize {
    let mut i = 0;
    while i < RUN_COLUMNS.len() {
        let c = RUN_COLUMNS[i].as_bytes();
        let n = name.as_bytes();
        if c.len() == n.len() {
            let mut k = 0;
            while k < c.len() && c[k] == n[k] {
                k += 1;
            }
            if k == c.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not a run column")
}

/// Maps a row of the run columns, by name.
fn run_from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let status: String = row.get(const { col("status") })?;
    let backoff: String = row.get(const { col("backoff") })?;
    Ok(Run {
        seq: row.get(const { col("seq") })?,
        id: row.get(const { col("id") })?,
        agent: row.get(const { col("agent") })?,
        entrypoint: row.get(const { col("entrypoint") })?,
        input: row.get(const { col("input") })?,
        status: RunStatus::parse(&status).ok_or_else(|| {
            conversion(const { col("status") }, format!("unknown status {status}"))
        })?,
        attempt: row.get(const { col("attempt") })?,
        max_attempts: row.get(const { col("max_attempts") })?,
        lease_losses: row.get(const { col("lease_losses") })?,
        priority: row.get(const { col("priority") })?,
        run_at: row.get(const { col("run_at") })?,
        timeout_ms: row.get(const { col("timeout_ms") })?,
        backoff: serde_json::from_str::<Backoff>(&backoff)
            .map_err(|e| conversion(const { col("backoff") }, e.to_string()))?,
        concurrency_key: row.get(const { col("concurrency_key") })?,
        idempotency_key: row.get(const { col("idempotency_key") })?,
        metadata: row.get(const { col("metadata") })?,
        result: row.get(const { col("result") })?,
        error: row.get(const { col("error") })?,
        cancel_requested: row.get(const { col("cancel_requested") })?,
        lease_owner: row.get(const { col("lease_owner") })?,
        lease_expires_at: row.get(const { col("lease_expires_at") })?,
        created_at: row.get(const { col("created_at") })?,
        started_at: row.get(const { col("started_at") })?,
        finished_at: row.get(const { col("finished_at") })?,
        updated_at: row.get(const { col("updated_at") })?,
    })
}

fn insert_event(
    c: &Connection,
    run_id: &str,
    kind: EventKind,
    data: &str,
    at: i64,
) -> rusqlite::Result<RunEvent> {
    let seq: i64 = c
        .prepare_cached(sql!("insert_event"))?
        .query_row(params![run_id, kind.as_str(), data, at], |r| r.get(0))?;
    Ok(RunEvent {
        run_id: run_id.to_string(),
        seq,
        kind,
        data: data.to_string(),
        at,
    })
}

fn holds_lease(c: &Connection, lease: &LeaseRef) -> rusqlite::Result<bool> {
    c.prepare_cached(sql!("check_lease"))?
        .query_row(
            params![lease.run_id, lease.owner, lease.attempt],
            |_| Ok(()),
        )
        .optional()
        .map(|r| r.is_some())
}

pub fn create_run(
    c: &Connection,
    run: &NewRun,
    claim: Option<&DirectClaim>,
) -> rusqlite::Result<Result<CreateOutcome, StoreError>> {
    if let Some(key) = &run.idempotency_key {
        let found: Option<(String, Option<String>)> = c
            .prepare_cached(sql!("find_idempotency_key"))?
            .query_row(params![run.idempotency_scope, key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((existing_id, hash)) = found {
            if hash == run.request_hash {
                let existing = get_run(c, &existing_id)?;
                return Ok(existing
                    .map(CreateOutcome::Existing)
                    .ok_or_else(|| StoreError::Internal("an idempotent run vanished".into())));
            }
            return Ok(Ok(CreateOutcome::Conflict { existing_id }));
        }
    }
    let backoff = serde_json::to_string(&run.backoff).map_err(|e| conversion(0, e.to_string()))?;
    let stored = c.prepare_cached(sql!("insert_run"))?.query_row(
        params![
            run.id,
            run.agent,
            run.entrypoint,
            run.input,
            run.max_attempts,
            run.priority,
            run.run_at,
            run.timeout_ms,
            backoff,
            run.concurrency_key,
            run.idempotency_key,
            run.request_hash,
            run.metadata,
            run.created_at,
            run.idempotency_scope,
        ],
        run_from_row,
    )?;
    if let Some(url) = &run.callback_url {
        super::callbacks::insert(c, &stored.id, url, run.created_at)?;
    }
    super::triggers::insert_link(c, run)?;
    let data = queued_event_data(&stored);
    let event = insert_event(c, &stored.id, EventKind::Queued, &data, run.created_at)?;
    let claimed = match claim {
        Some(claim) if may_claim_directly(c, &stored)? => {
            let request = ClaimRequest {
                node: claim.node.clone(),
                owner: claim.owner.clone(),
                now: run.created_at,
                lease_until: claim.lease_until,
                per_agent: Vec::new(),
                cluster: Default::default(),
                entrypoint_caps: Vec::new(),
            };
            Some(claim_one(c, &stored.id, &request)?)
        }
        _ => None,
    };
    let stored = claimed.as_ref().map_or(stored, |c| c.run.clone());
    Ok(Ok(CreateOutcome::Created {
        run: stored,
        event,
        claimed,
    }))
}

/// A new run may skip the queue when it is due, has no concurrency key, and no due run of its
/// agent waits ahead of it (so priority and FIFO order still hold).
fn may_claim_directly(c: &Connection, run: &Run) -> rusqlite::Result<bool> {
    if run.concurrency_key.is_some() || run.run_at > run.created_at {
        return Ok(false);
    }
    let waiting = c
        .prepare_cached(sql!("due_queued_exists"))?
        .query_row(params![run.agent, run.run_at, run.seq], |_| Ok(()))
        .optional()?;
    Ok(waiting.is_none())
}

/// Leases one queued run to the claimer; its `run.started` waits for its code to start.
fn claim_one(c: &Connection, id: &str, req: &ClaimRequest) -> rusqlite::Result<ClaimedRun> {
    let run = c.prepare_cached(sql!("claim_run"))?.query_row(
        params![id, req.node, req.owner, req.lease_until, req.now],
        run_from_row,
    )?;
    let checkpoint: Option<String> = c
        .prepare_cached(sql!("latest_checkpoint"))?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    Ok(ClaimedRun { run, checkpoint })
}

/// Records the start of the attempt's code, fenced by the lease.
pub fn start_attempt(
    c: &Connection,
    lease: &LeaseRef,
    start: &AttemptStart,
) -> rusqlite::Result<Result<RunEvent, StoreError>> {
    let held = c
        .prepare_cached(sql!("start_attempt"))?
        .query_row(
            params![lease.run_id, lease.owner, lease.attempt, start.at],
            |_| Ok(()),
        )
        .optional()?;
    if held.is_none() {
        return Ok(Err(StoreError::LeaseLost));
    }
    let data = started_event_data(lease.attempt, &start.node);
    insert_event(c, &lease.run_id, EventKind::Started, &data, start.at).map(Ok)
}

pub fn get_run(c: &Connection, id: &str) -> rusqlite::Result<Option<Run>> {
    c.prepare_cached(sql!("get_run"))?
        .query_row(params![id], run_from_row)
        .optional()
}

pub fn list_runs(c: &Connection, q: &RunQuery) -> rusqlite::Result<Vec<Run>> {
    let mut stmt = c.prepare_cached(sql!("list_runs"))?;
    let rows = stmt.query_map(
        params![
            q.agent,
            q.status.map(RunStatus::as_str),
            q.entrypoint,
            q.concurrency_key,
            q.before_seq.unwrap_or(i64::MAX),
            q.limit as i64,
        ],
        run_from_row,
    )?;
    rows.collect()
}

pub fn claim_runs(c: &Connection, req: &ClaimRequest) -> rusqlite::Result<Claimed> {
    let mut out = Claimed::default();
    let mut short = false;
    for (agent, free) in &req.per_agent {
        if *free == 0 {
            continue;
        }
        let mut room = agentry_core::runs::EntrypointRoom::default();
        for cap in req.caps_of(agent) {
            let running: i64 = c
                .prepare_cached(sql!("running_in_entrypoint"))?
                .query_row(params![agent, cap.entrypoint], |r| r.get(0))?;
            room.add(cap, running.max(0) as usize);
        }
        let candidates: Vec<(String, String)> = {
            let mut stmt = c.prepare_cached(sql!("claim_candidates"))?;
            let rows = stmt.query_map(
                params![agent, req.now, *free as i64, room.full_json()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        short |= candidates.len() < *free;
        for (id, entrypoint) in candidates {
            if room.take(&entrypoint) {
                out.runs.push(claim_one(c, &id, req)?);
            }
        }
        out.held_back |= room.held_back();
    }
    if short {
        out.next_due = c
            .prepare_cached(sql!("next_due"))?
            .query_row(params![req.now], |r| r.get(0))?;
    }
    Ok(out)
}

pub fn renew_leases(
    c: &Connection,
    leases: &[LeaseRef],
    until: i64,
    heartbeat: &[String],
    now: i64,
) -> rusqlite::Result<Vec<Renewal>> {
    let mut out = Vec::with_capacity(leases.len());
    for lease in leases {
        let cancel: Option<bool> = c
            .prepare_cached(sql!("renew_lease"))?
            .query_row(
                params![lease.run_id, lease.owner, lease.attempt, until, now],
                |r| r.get(0),
            )
            .optional()?;
        if cancel.is_some() && heartbeat.contains(&lease.run_id) {
            let data = format!("{{\"attempt\":{}}}", lease.attempt);
            insert_event(c, &lease.run_id, EventKind::Heartbeat, &data, now)?;
        }
        out.push(Renewal {
            run_id: lease.run_id.clone(),
            attempt: lease.attempt,
            held: cancel.is_some(),
            cancel_requested: cancel.unwrap_or(false),
        });
    }
    Ok(out)
}

pub fn append_events(
    c: &Connection,
    lease: &LeaseRef,
    events: &[NewEvent],
    now: i64,
) -> rusqlite::Result<Result<Vec<RunEvent>, StoreError>> {
    if !holds_lease(c, lease)? {
        return Ok(Err(StoreError::LeaseLost));
    }
    let stored = events
        .iter()
        .map(|e| insert_event(c, &lease.run_id, e.kind.clone(), &e.data, now))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Ok(stored))
}

pub fn save_checkpoint(
    c: &Connection,
    lease: &LeaseRef,
    state: &str,
    now: i64,
) -> rusqlite::Result<Result<RunEvent, StoreError>> {
    if !holds_lease(c, lease)? {
        return Ok(Err(StoreError::LeaseLost));
    }
    let seq: i64 = c
        .prepare_cached(sql!("insert_checkpoint"))?
        .query_row(params![lease.run_id, lease.attempt, state, now], |r| {
            r.get(0)
        })?;
    let data = checkpoint_event_data(seq, state);
    insert_event(c, &lease.run_id, EventKind::Checkpoint, &data, now).map(Ok)
}

pub fn finish_run(
    c: &Connection,
    lease: &LeaseRef,
    outcome: &Outcome,
    start: Option<&AttemptStart>,
    now: i64,
) -> rusqlite::Result<Result<Finished, StoreError>> {
    let started = match start {
        Some(start) => match start_attempt(c, lease, start)? {
            Ok(event) => Some(event),
            Err(lost) => return Ok(Err(lost)),
        },
        None => None,
    };
    let t = transition(outcome, lease.attempt, now);
    let run = c
        .prepare_cached(sql!("finish_run"))?
        .query_row(
            params![
                lease.run_id,
                lease.owner,
                lease.attempt,
                t.status.as_str(),
                t.result,
                t.error,
                t.finished_at,
                t.run_at,
                now
            ],
            run_from_row,
        )
        .optional()?;
    let Some(run) = run else {
        return Ok(Err(StoreError::LeaseLost));
    };
    let event = insert_event(c, &run.id, t.event, &t.data, now)?;
    Ok(Ok(Finished {
        run,
        events: started.into_iter().chain([event]).collect(),
    }))
}

pub fn cancel_run(c: &Connection, id: &str, now: i64) -> rusqlite::Result<CancelOutcome> {
    let error = CANCELLED_BEFORE_START;
    let queued = c
        .prepare_cached(sql!("cancel_queued"))?
        .query_row(params![id, error, now], run_from_row)
        .optional()?;
    if let Some(run) = queued {
        let data = format!("{{\"attempt\":{},\"error\":{error}}}", run.attempt);
        let event = insert_event(c, id, EventKind::Cancelled, &data, now)?;
        return Ok(CancelOutcome::Cancelled(Finished {
            run,
            events: vec![event],
        }));
    }
    let requested = c
        .prepare_cached(sql!("request_cancel"))?
        .query_row(params![id, now], run_from_row)
        .optional()?;
    if let Some(run) = requested {
        let event = insert_event(c, id, EventKind::CancelRequested, "{}", now)?;
        return Ok(CancelOutcome::Requested {
            run,
            event: Some(event),
        });
    }
    Ok(match get_run(c, id)? {
        // Asked before: the node running it already knows.
        Some(run) if run.status == RunStatus::Running => {
            CancelOutcome::Requested { run, event: None }
        }
        Some(run) => CancelOutcome::AlreadyFinished(run),
        None => CancelOutcome::NotFound,
    })
}

pub fn last_event_seq(c: &Connection, id: &str) -> rusqlite::Result<i64> {
    c.prepare_cached(sql!("last_event_seq"))?
        .query_row(params![id], |r| r.get(0))
}

pub fn events_after(
    c: &Connection,
    id: &str,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<RunEvent>> {
    let mut stmt = c.prepare_cached(sql!("events_after"))?;
    let rows = stmt.query_map(params![id, after, limit as i64], |r| {
        Ok(RunEvent {
            run_id: r.get("run_id")?,
            seq: r.get("seq")?,
            kind: EventKind::parse(&r.get::<_, String>("kind")?),
            data: r.get("data")?,
            at: r.get("at")?,
        })
    })?;
    rows.collect()
}

/// The global log after `after`; see `RunStore::log_after`. One writer commits in insertion
/// order, so the log's numbers never fill in behind a reader.
pub fn log_after(
    c: &Connection,
    after: agentry_core::events::EventCursor,
    limit: usize,
    agents: Option<&[String]>,
) -> rusqlite::Result<agentry_core::events::LogPage> {
    use agentry_core::events::{EventCursor, LogPage, LoggedEvent};
    let mut stmt = c.prepare_cached(sql!("log_after"))?;
    let rows = stmt.query_map(params![after.gseq, limit as i64], |r| {
        Ok(LoggedEvent {
            cursor: EventCursor {
                tx: 0,
                gseq: r.get(0)?,
            },
            event: RunEvent {
                run_id: r.get(1)?,
                seq: r.get(2)?,
                kind: EventKind::parse(&r.get::<_, String>(3)?),
                data: r.get(4)?,
                at: r.get(5)?,
            },
            agent: r.get(6)?,
            entrypoint: r.get(7)?,
            correlation_id: r.get(8)?,
            depth: r.get(9)?,
        })
    })?;
    let mut page = LogPage {
        events: Vec::new(),
        next: EventCursor {
            tx: 0,
            gseq: after.gseq,
        },
    };
    for row in rows {
        let e = row?;
        page.next = e.cursor;
        if agents.is_none_or(|a| a.contains(&e.agent)) {
            page.events.push(e);
        }
    }
    Ok(page)
}

/// Requeues (or, past the allowance of lost leases, fails) the runs whose node is gone. A run
/// whose cancellation was requested is cancelled instead.
pub fn recover_leases(
    c: &Connection,
    now: i64,
    node: Option<&(String, String)>,
    alive: &[LeaseRef],
) -> rusqlite::Result<Vec<Finished>> {
    let (node_name, owner) = match node {
        Some((n, o)) => (Some(n.as_str()), Some(o.as_str())),
        None => (None, None),
    };
    let lost: Vec<Run> = {
        let mut stmt = c.prepare_cached(sql!("lost_leases"))?;
        let rows = stmt.query_map(params![now, node_name, owner], run_from_row)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut out = Vec::with_capacity(lost.len());
    for run in lost {
        if LostAttempt::is_alive(&run, alive) {
            continue;
        }
        let lost = LostAttempt::of(&run, now);
        let updated = c
            .prepare_cached(sql!("requeue_lost"))?
            .query_row(
                params![
                    run.id,
                    now,
                    lost.status.as_str(),
                    lost.error,
                    lost.finished_at
                ],
                run_from_row,
            )
            .optional()?;
        let Some(updated) = updated else { continue };
        let event = insert_event(c, &run.id, lost.event, &lost.data, now)?;
        out.push(Finished {
            run: updated,
            events: vec![event],
        });
    }
    Ok(out)
}

/// Log entries trimmed per step, and steps per purge pass.
const LOG_TRIM_BATCH: i64 = 10_000;
const LOG_TRIM_STEPS: usize = 10;

pub fn purge_finished(c: &Connection, before: i64, limit: usize) -> rusqlite::Result<usize> {
    let ids: Vec<String> = {
        let mut stmt = c.prepare_cached(sql!("purge_candidates"))?;
        let rows = stmt.query_map(params![before, limit as i64], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for id in &ids {
        c.prepare_cached(sql!("purge_events"))?
            .execute(params![id])?;
        c.prepare_cached(sql!("purge_checkpoints"))?
            .execute(params![id])?;
        super::callbacks::purge(c, id)?;
        super::triggers::purge_link(c, id)?;
        c.prepare_cached(sql!("purge_run"))?.execute(params![id])?;
    }
    if !ids.is_empty() {
        // The log's entries of the runs just purged (and of earlier ones), in bounded steps:
        // the writer is held meanwhile.
        for _ in 0..LOG_TRIM_STEPS {
            let trimmed = c
                .prepare_cached(sql!("purge_event_log"))?
                .execute(params![LOG_TRIM_BATCH])?;
            if trimmed < LOG_TRIM_BATCH as usize {
                break;
            }
        }
    }
    Ok(ids.len())
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let scopes: String = row.get("scopes")?;
    let agents: Option<String> = row.get("agents")?;
    Ok(ApiKey {
        id: row.get("id")?,
        name: row.get("name")?,
        hash: row.get("hash")?,
        scopes: serde_json::from_str(&scopes).map_err(|e| conversion(3, e.to_string()))?,
        agents: agents
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(|e| conversion(4, e.to_string()))?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        revoked_at: row.get("revoked_at")?,
        last_used_at: row.get("last_used_at")?,
    })
}

pub fn create_key(c: &Connection, key: &ApiKey) -> rusqlite::Result<()> {
    let scopes = serde_json::to_string(&key.scopes).map_err(|e| conversion(3, e.to_string()))?;
    let agents = key
        .agents
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| conversion(4, e.to_string()))?;
    c.prepare_cached(sql!("insert_key"))?.execute(params![
        key.id,
        key.name,
        key.hash,
        scopes,
        agents,
        key.created_at,
        key.expires_at
    ])?;
    Ok(())
}

pub fn list_keys(c: &Connection) -> rusqlite::Result<Vec<ApiKey>> {
    let mut stmt = c.prepare_cached(sql!("list_keys"))?;
    let rows = stmt.query_map([], key_from_row)?;
    rows.collect()
}

pub fn revoke_key(c: &Connection, id: &str, now: i64) -> rusqlite::Result<Option<ApiKey>> {
    c.prepare_cached(sql!("revoke_key"))?
        .query_row(params![id, now], key_from_row)
        .optional()
}

pub fn touch_keys(c: &Connection, used: &[(String, i64)]) -> rusqlite::Result<()> {
    for (id, at) in used {
        c.prepare_cached(sql!("touch_key"))?
            .execute(params![id, at])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query whose rows `run_from_row` reads names exactly the run columns, in order.
    #[test]
    fn every_run_query_names_the_run_columns() {
        let c = Connection::open_in_memory().expect("db");
        for migration in super::super::MIGRATIONS {
            c.execute_batch(migration).expect("migrate");
        }
        for (name, sql) in [
            ("cancel_queued", sql!("cancel_queued")),
            ("claim_run", sql!("claim_run")),
            ("finish_run", sql!("finish_run")),
            ("get_run", sql!("get_run")),
            ("insert_run", sql!("insert_run")),
            ("list_runs", sql!("list_runs")),
            ("lost_leases", sql!("lost_leases")),
            ("request_cancel", sql!("request_cancel")),
            ("requeue_lost", sql!("requeue_lost")),
        ] {
            let stmt = c.prepare(sql).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(stmt.column_names(), RUN_COLUMNS, "{name}");
        }
    }
}
