//! The run store and the API keys on PostgreSQL, for several nodes on one database. The same
//! semantics as the SQLite store (the contract suite runs against both), but where SQLite has
//! one writer, here several nodes write at once, so:
//!
//! * every operation is one short transaction on a pooled connection (none is held across an
//!   agent's run);
//! * claims lock their candidates `FOR UPDATE SKIP LOCKED`: nodes claiming together take
//!   different runs instead of waiting on each other; a run with a concurrency key is claimed
//!   only under that key's transaction-scoped advisory lock, so one key never runs twice;
//! * every write of a running attempt is fenced on (owner, attempt) and takes the run's row
//!   lock first, so the event numbers of one run never collide whichever node writes them;
//! * the reaper skips rows another reaper is handling, and requeues only the attempt it saw.
//!
//! The SQL is in `queries/*.sql` (the same names as SQLite's) and `migrations/*.sql`.

use agentry_core::keys::ApiKey;
use agentry_core::nodes::{NodeRecord, NodeReport};
use agentry_core::runs::{
    AttemptStart, Backoff, CancelOutcome, ClaimRequest, Claimed, ClaimedRun, CreateOutcome,
    DirectClaim, EventKind, Finished, LeaseRef, NewEvent, NewRun, Outcome, Renewal, Run, RunEvent,
    RunQuery, RunStatus, now_ms,
};
use agentry_core::store::{KeyStore, RunStore, StoreChange, StoreChanges, StoreError};
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use std::str::FromStr;
use std::time::Duration;

use super::batch::Batcher;
use crate::transitions::{
    CANCELLED_BEFORE_START, LostAttempt, checkpoint_event_data, queued_event_data,
    started_event_data, transition,
};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

/// Schema migrations, in order, numbered from 1; `agentry_migrations` records which ran.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_runs", include_str!("migrations/0001_runs.sql")),
    (
        "0002_api_keys",
        include_str!("migrations/0002_api_keys.sql"),
    ),
    (
        "0003_idempotency_scope",
        include_str!("migrations/0003_idempotency_scope.sql"),
    ),
    (
        "0004_nodes_and_buckets",
        include_str!("migrations/0004_nodes_and_buckets.sql"),
    ),
    (
        "0005_node_homes",
        include_str!("migrations/0005_node_homes.sql"),
    ),
    ("0006_batches", include_str!("migrations/0006_batches.sql")),
    (
        "0007_invocations",
        include_str!("migrations/0007_invocations.sql"),
    ),
    (
        "0008_schedules",
        include_str!("migrations/0008_schedules.sql"),
    ),
    (
        "0009_callbacks",
        include_str!("migrations/0009_callbacks.sql"),
    ),
    (
        "0010_event_log",
        include_str!("migrations/0010_event_log.sql"),
    ),
    (
        "0011_triggers",
        include_str!("migrations/0011_triggers.sql"),
    ),
];

/// The NOTIFY channels (see `Notifier`).
const CHANNELS: [&str; 3] = ["agentry_runs", "agentry_events", "agentry_cancels"];

/// What a committed write tells the other nodes.
enum Notice {
    /// A run was queued (created, retried, requeued): claim what is due.
    RunsDue,
    /// A run's log grew to `seq`.
    Events { run_id: String, seq: i64 },
    /// A cancel was asked for a running run.
    Cancel { run_id: String },
}

/// Sends the other nodes NOTIFYs for what this node committed, after the commit and outside the
/// writing transaction, batched: all that piled up while the last batch was sent go in one
/// statement. (A NOTIFY inside the writing transaction would take PostgreSQL's notify-queue
/// lock across that transaction's commit and its WAL flush, serialising every commit of every
/// node: it cut throughput by a third when measured.) A crash between the commit and the
/// notice loses the notice; the other nodes' polls cover it, as for any lost notification.
#[derive(Clone)]
pub(super) struct Notifier(tokio::sync::mpsc::UnboundedSender<Notice>);

impl Notifier {
    fn start(pool: PgPool, schema: std::sync::Arc<str>) -> Notifier {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Notice>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 4096).await > 0 {
                let mut channels: Vec<&str> = Vec::with_capacity(batch.len());
                let mut payloads: Vec<String> = Vec::with_capacity(batch.len());
                let mut runs_due = false;
                // Per run, only the furthest sequence number matters.
                let mut grown: std::collections::HashMap<&str, i64> = Default::default();
                for notice in &batch {
                    match notice {
                        Notice::RunsDue => runs_due = true,
                        Notice::Events { run_id, seq } => {
                            let e = grown.entry(run_id.as_str()).or_insert(*seq);
                            *e = (*e).max(*seq);
                        }
                        Notice::Cancel { run_id } => {
                            channels.push("agentry_cancels");
                            payloads.push(format!("{schema} {run_id}"));
                        }
                    }
                }
                if runs_due {
                    channels.push("agentry_runs");
                    payloads.push(schema.to_string());
                }
                for (run_id, seq) in grown {
                    channels.push("agentry_events");
                    payloads.push(format!("{schema} {run_id} {seq}"));
                }
                let sent = sqlx::query(sql!("notify"))
                    .bind(&channels)
                    .bind(&payloads)
                    .execute(&pool)
                    .await;
                if let Err(e) = sent {
                    tracing::debug!("could not notify the other nodes: {e}");
                }
                batch.clear();
            }
        });
        Notifier(tx)
    }

    pub(super) fn runs_due(&self) {
        let _ = self.0.send(Notice::RunsDue);
    }

    fn events(&self, events: &[RunEvent]) {
        if let Some(last) = events.iter().max_by_key(|e| e.seq) {
            let _ = self.0.send(Notice::Events {
                run_id: last.run_id.clone(),
                seq: last.seq,
            });
        }
    }

    fn cancel(&self, run_id: &str) {
        let _ = self.0.send(Notice::Cancel {
            run_id: run_id.to_string(),
        });
    }

    /// What a finished attempt (or a requeue, or a cancel) tells: its events, and a run to
    /// claim if it went back to the queue.
    fn finished(&self, f: &Finished) {
        self.events(&f.events);
        // Requeued, or the end of a run that held up the next of its concurrency key.
        if f.run.status == RunStatus::Queued || f.run.concurrency_key.is_some() {
            self.runs_due();
        }
    }
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A `postgres://` URL. Never logged: it may carry a password.
    pub url: String,
    /// Connections this node keeps at most.
    pub max_connections: u32,
    /// Batches of each kind on the wire at once (group commit, see `batch.rs`).
    pub batches_in_flight: u32,
    /// How long an operation waits for a free connection (or a new one) before failing with
    /// `Unavailable`, which the API answers 503.
    pub acquire_timeout: Duration,
    /// Tables go in this schema (created if missing) instead of the URL's default: one database
    /// can hold several independent stores (the tests use one per test).
    pub schema: Option<String>,
}

/// One schema migration, as `agentry migrate --status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i32,
    pub name: String,
    /// When it was applied (Unix ms); `None`: pending.
    pub applied_at: Option<i64>,
    /// False for a migration a newer Agentry applied.
    pub known: bool,
}

/// The PostgreSQL implementation of [`RunStore`] and [`KeyStore`]. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    /// The schema the tables are in: NOTIFY payloads start with it.
    schema: std::sync::Arc<str>,
    pub(super) notifier: Notifier,
    batches: Batches,
}

/// The operations sent in batches (group commit, see `batch.rs`).
#[derive(Clone)]
struct Batches {
    creates: Batcher<CreateRequest, CreateOutcome>,
    finishes: Batcher<FinishRequest, Finished>,
    reads: Batcher<String, Option<Run>>,
}

/// Most requests in one batch: big enough that a busy node needs few round trips, small enough
/// that one statement's arrays stay far below any protocol limit.
const BATCH_MAX: usize = 128;

impl Batches {
    /// At most `in_flight` batches of each kind at once (each holds one pooled connection).
    /// Fewer in flight make bigger batches: on a database short of CPU, one of each kind was
    /// fastest (BENCHMARKS.md).
    fn start(pool: &PgPool, in_flight: usize) -> Self {
        let p = pool.clone();
        let creates = Batcher::start(BATCH_MAX, in_flight, move |batch: Vec<CreateRequest>| {
            let p = p.clone();
            async move { insert_runs(&p, &batch).await.map_err(db_err) }
        });
        let p = pool.clone();
        let finishes = Batcher::start(BATCH_MAX, in_flight, move |batch: Vec<FinishRequest>| {
            let p = p.clone();
            async move { finish_runs(&p, &batch).await }
        });
        let p = pool.clone();
        let reads = Batcher::start(BATCH_MAX, in_flight, move |ids: Vec<String>| {
            let p = p.clone();
            async move { get_runs(&p, &ids).await }
        });
        Self {
            creates,
            finishes,
            reads,
        }
    }
}

/// SQLSTATEs after which the same request may well succeed: the connection or the server went
/// away (class 08, 57P01-57P03: an administrator's or a crash's shutdown, the server starting
/// up), it is short of resources (class 53), the transaction lost a conflict (40001, 40P01), or
/// a timeout stopped it (55P03 lock, 57014 statement, 25P03 idle in transaction).
fn is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03" | "57014" | "25P03"
        )
}

pub(super) fn db_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.code().is_some_and(|c| is_transient(&c)) => {
            StoreError::Unavailable(d.to_string())
        }
        sqlx::Error::Database(d) => StoreError::Internal(d.to_string()),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Internal(e.to_string()),
        // The network, the pool, a restarted server: the caller may retry.
        _ => StoreError::Unavailable(e.to_string()),
    }
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

impl PgStore {
    /// Connects and brings the schema up to date (under an advisory lock, so that many nodes
    /// starting at once migrate it once). Refuses a database migrated by a newer Agentry.
    pub async fn connect(options: &PgOptions) -> Result<Self, StoreError> {
        let store = Self::connect_unmigrated(options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without touching the schema (`agentry migrate --status`).
    pub async fn connect_unmigrated(options: &PgOptions) -> Result<Self, StoreError> {
        let mut connect = PgConnectOptions::from_str(&options.url).map_err(|e| {
            StoreError::Internal(format!("not a PostgreSQL URL: {}", redact_error(&e)))
        })?;
        // Visible in pg_stat_activity; with the schema, so one deployment's connections can be
        // told from another's.
        connect = connect.application_name(&match &options.schema {
            Some(schema) => format!("agentry {schema}"),
            None => "agentry".to_string(),
        });
        if let Some(schema) = &options.schema {
            if !agentry_core::settings::is_schema_name(schema) {
                return Err(StoreError::Internal(format!(
                    "`{schema}` is not a schema name (lowercase letters, digits, _)"
                )));
            }
            let mut first = PgConnection::connect_with(&connect).await.map_err(db_err)?;
            // `is_schema_name` allows only [a-z0-9_]: nothing to inject.
            let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}"
            )))
            .execute(&mut first)
            .await;
            // Nodes starting together race on the catalogue; the loser's schema exists.
            match created {
                Ok(_) => {}
                Err(sqlx::Error::Database(d))
                    if matches!(d.code().as_deref(), Some("23505" | "42P06")) => {}
                Err(e) => return Err(db_err(e)),
            }
            let _ = first.close().await;
            connect = connect.options([("search_path", schema.as_str())]);
        }
        // One more than asked: the change listener keeps a connection of its own for good.
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1) + 1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(db_err)?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()::TEXT")
            .fetch_one(&pool)
            .await
            .map_err(db_err)?;
        let schema: std::sync::Arc<str> = schema.into();
        Ok(Self {
            notifier: Notifier::start(pool.clone(), std::sync::Arc::clone(&schema)),
            batches: Batches::start(&pool, options.batches_in_flight.max(1) as usize),
            pool,
            schema,
        })
    }

    /// Tells the other nodes of a committed creation: a run to claim, unless this node leased
    /// it. Its `run.queued` event is not announced: no one elsewhere can be following a run
    /// whose id was not given out yet (a follower that comes later reads the log first).
    fn created(&self, outcome: &CreateOutcome) {
        if let CreateOutcome::Created { claimed: None, .. } = outcome {
            self.notifier.runs_due();
        }
    }

    /// RunAgent's invocation history in this database (its schema, its pool), shared by the
    /// nodes on it.
    pub fn shared_history(&self) -> super::PgHistory {
        super::PgHistory::beside(&self.pool)
    }

    /// The rate-limit buckets in this database (its schema, its pool): what the gateway's
    /// shared limiter uses when no other database is named for it.
    pub fn shared_buckets(&self) -> super::PgBuckets {
        super::PgBuckets::from_pool(self.pool.clone())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(include_str!("queries/schema_lock.sql"))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::raw_sql(sql!("migrations_table"))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let applied: Option<i32> =
            sqlx::query_scalar("SELECT max(version) FROM agentry_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        let applied = applied.unwrap_or(0) as usize;
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Internal(format!(
                "the database is at schema version {applied}, made by a newer Agentry; this one knows versions up to {}",
                MIGRATIONS.len()
            )));
        }
        for (i, (name, migration)) in MIGRATIONS.iter().enumerate().skip(applied) {
            sqlx::raw_sql(*migration)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query(
                "INSERT INTO agentry_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(i as i32 + 1)
            .bind(*name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// Every migration this Agentry knows, and when each was applied here (`None`: pending);
    /// then any the database has that this Agentry does not know (a newer one applied them).
    pub async fn migrations(&self) -> Result<Vec<MigrationState>, StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('agentry_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
        let applied: Vec<(i32, String, i64)> = if exists {
            sqlx::query_as(
                "SELECT version, name, applied_at FROM agentry_migrations ORDER BY version",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
        } else {
            Vec::new()
        };
        let mut out: Vec<MigrationState> = MIGRATIONS
            .iter()
            .enumerate()
            .map(|(i, (name, _))| MigrationState {
                version: i as i32 + 1,
                name: (*name).to_string(),
                applied_at: applied
                    .iter()
                    .find(|(v, _, _)| *v == i as i32 + 1)
                    .map(|(_, _, at)| *at),
                known: true,
            })
            .collect();
        for (version, name, at) in applied {
            if version as usize > MIGRATIONS.len() {
                out.push(MigrationState {
                    version,
                    name,
                    applied_at: Some(at),
                    known: false,
                });
            }
        }
        Ok(out)
    }

    /// The pool, for the tests' fault injection.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// sqlx's URL errors may quote the URL; say only what kind of error it was.
fn redact_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => "malformed".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

fn u32_of(row: &PgRow, i: usize) -> Result<u32, sqlx::Error> {
    let v: i64 = row.try_get(i)?;
    u32::try_from(v).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A row of the run columns (the order every run query names them in, as SQLite's).
fn run_from_row(row: &PgRow) -> Result<Run, sqlx::Error> {
    let status: String = row.try_get(5)?;
    let backoff: String = row.try_get(12)?;
    Ok(Run {
        seq: row.try_get(0)?,
        id: row.try_get(1)?,
        agent: row.try_get(2)?,
        entrypoint: row.try_get(3)?,
        input: row.try_get(4)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?,
        attempt: u32_of(row, 6)?,
        max_attempts: u32_of(row, 7)?,
        lease_losses: u32_of(row, 8)?,
        priority: row.try_get(9)?,
        run_at: row.try_get(10)?,
        timeout_ms: row.try_get(11)?,
        backoff: serde_json::from_str::<Backoff>(&backoff)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        concurrency_key: row.try_get(13)?,
        idempotency_key: row.try_get(14)?,
        metadata: row.try_get(15)?,
        result: row.try_get(16)?,
        error: row.try_get(17)?,
        cancel_requested: row.try_get(18)?,
        lease_owner: row.try_get(19)?,
        lease_expires_at: row.try_get(20)?,
        created_at: row.try_get(21)?,
        started_at: row.try_get(22)?,
        finished_at: row.try_get(23)?,
        updated_at: row.try_get(24)?,
    })
}

fn runs(rows: Vec<PgRow>) -> Result<Vec<Run>, StoreError> {
    rows.iter()
        .map(run_from_row)
        .collect::<Result<_, _>>()
        .map_err(db_err)
}

fn one_run(row: Option<PgRow>) -> Result<Option<Run>, StoreError> {
    row.as_ref().map(run_from_row).transpose().map_err(db_err)
}

// ---------------------------------------------------------------------------------------------
// Operations, each on one connection inside the caller's transaction
// ---------------------------------------------------------------------------------------------

/// Appends one event; the caller holds the run's row lock.
async fn insert_event(
    c: &mut PgConnection,
    run_id: &str,
    kind: EventKind,
    data: &str,
    at: i64,
) -> Result<RunEvent, StoreError> {
    let seq: i64 = sqlx::query_scalar(sql!("insert_event"))
        .bind(run_id)
        .bind(kind.as_str())
        .bind(data)
        .bind(at)
        .fetch_one(&mut *c)
        .await
        .map_err(db_err)?;
    Ok(RunEvent {
        run_id: run_id.to_string(),
        seq,
        kind,
        data: data.to_string(),
        at,
    })
}

/// Whether the lease is still this attempt's; locks the run's row for the transaction.
async fn holds_lease(c: &mut PgConnection, lease: &LeaseRef) -> Result<bool, StoreError> {
    let found: Option<i32> = sqlx::query_scalar(sql!("check_lease"))
        .bind(&lease.run_id)
        .bind(&lease.owner)
        .bind(i64::from(lease.attempt))
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    Ok(found.is_some())
}

pub(super) async fn get_run(c: &mut PgConnection, id: &str) -> Result<Option<Run>, StoreError> {
    let row = sqlx::query(sql!("get_run"))
        .bind(id)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    one_run(row)
}

/// Leases the runs `ids` (locked by this transaction) with their last checkpoints, in the
/// order given.
async fn claim_batch(
    c: &mut PgConnection,
    ids: &[String],
    req: &ClaimRequest,
) -> Result<Vec<ClaimedRun>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(sql!("claim_runs_batch"))
        .bind(ids)
        .bind(&req.node)
        .bind(&req.owner)
        .bind(req.lease_until - req.now)
        .bind(req.now)
        .fetch_all(&mut *c)
        .await
        .map_err(db_err)?;
    let mut leased: std::collections::HashMap<String, Run> =
        runs(rows)?.into_iter().map(|r| (r.id.clone(), r)).collect();
    let checkpoints: std::collections::HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>(sql!("latest_checkpoints"))
            .bind(ids)
            .fetch_all(&mut *c)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
    Ok(ids
        .iter()
        .filter_map(|id| {
            leased.remove(id).map(|run| ClaimedRun {
                checkpoint: checkpoints.get(id).cloned(),
                run,
            })
        })
        .collect())
}

/// The `run.queued` event's data of a run about to be stored (the same as of the stored run).
fn queued_event_data_of(run: &NewRun) -> String {
    crate::transitions::queued_event_data_parts(run.priority, run.run_at)
}

/// Looks an idempotency key up (in the caller's transaction): the run it made, or a conflict
/// when it was made by another request. `None`: the key is new.
async fn find_idempotent(
    c: &mut PgConnection,
    run: &NewRun,
    key: &str,
) -> Result<Option<CreateOutcome>, StoreError> {
    let found: Option<(String, Option<String>)> = sqlx::query_as(sql!("find_idempotency_key"))
        .bind(&run.idempotency_scope)
        .bind(key)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    let Some((existing_id, hash)) = found else {
        return Ok(None);
    };
    if hash != run.request_hash {
        return Ok(Some(CreateOutcome::Conflict { existing_id }));
    }
    get_run(c, &existing_id)
        .await?
        .map(|r| Some(CreateOutcome::Existing(r)))
        .ok_or_else(|| StoreError::Internal("an idempotent run vanished".into()))
}

/// A run to create, with the lease its node asks for when the run may skip the queue.
pub(super) struct CreateRequest {
    pub(super) run: NewRun,
    pub(super) claim: Option<DirectClaim>,
}

/// Stores new runs (each leased to its claim at once when it may skip the queue) in one
/// statement; the outcomes in the order given. A unique violation (another request stored the
/// same idempotency key a moment ago) fails the statement; the keyed path then starts over.
pub(super) async fn insert_runs<'c>(
    c: impl sqlx::PgExecutor<'c>,
    batch: &[CreateRequest],
) -> Result<Vec<Result<CreateOutcome, StoreError>>, sqlx::Error> {
    let (node, owner) = batch
        .iter()
        .find_map(|q| q.claim.as_ref())
        .map_or((None, None), |c| {
            (Some(c.node.as_str()), Some(c.owner.as_str()))
        });
    // One node and owner per statement: a request whose claim names another is queued.
    let claims: Vec<bool> = batch
        .iter()
        .map(|q| {
            q.claim
                .as_ref()
                .is_some_and(|c| Some(c.node.as_str()) == node && Some(c.owner.as_str()) == owner)
        })
        .collect();
    let lease_ms = batch
        .iter()
        .filter_map(|q| q.claim.as_ref().map(|c| c.lease_until - q.run.created_at))
        .max()
        .unwrap_or(0);
    let mut backoffs = Vec::with_capacity(batch.len());
    for q in batch {
        backoffs.push(
            serde_json::to_string(&q.run.backoff).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
        );
    }
    let col = |f: fn(&NewRun) -> &str| batch.iter().map(|q| f(&q.run)).collect::<Vec<&str>>();
    let opt = |f: fn(&NewRun) -> Option<&str>| {
        batch
            .iter()
            .map(|q| f(&q.run))
            .collect::<Vec<Option<&str>>>()
    };
    let num = |f: fn(&NewRun) -> i64| batch.iter().map(|q| f(&q.run)).collect::<Vec<i64>>();
    let rows = sqlx::query(sql!("insert_run"))
        .bind(col(|r| &r.id))
        .bind(col(|r| &r.agent))
        .bind(col(|r| &r.entrypoint))
        .bind(col(|r| &r.input))
        .bind(num(|r| i64::from(r.max_attempts)))
        .bind(batch.iter().map(|q| q.run.priority).collect::<Vec<i32>>())
        .bind(num(|r| r.run_at))
        .bind(num(|r| r.timeout_ms))
        .bind(&backoffs)
        .bind(opt(|r| r.concurrency_key.as_deref()))
        .bind(opt(|r| r.idempotency_key.as_deref()))
        .bind(opt(|r| r.request_hash.as_deref()))
        .bind(col(|r| &r.metadata))
        .bind(num(|r| r.created_at))
        .bind(col(|r| &r.idempotency_scope))
        .bind(&claims)
        .bind(node)
        .bind(owner)
        .bind(lease_ms)
        .bind(
            batch
                .iter()
                .map(|q| queued_event_data_of(&q.run))
                .collect::<Vec<String>>(),
        )
        .bind(opt(|r| r.callback_url.as_deref()))
        .bind(opt(|r| r.correlation_id.as_deref()))
        .bind(
            batch
                .iter()
                .map(|q| q.run.depth as i32)
                .collect::<Vec<i32>>(),
        )
        .bind(opt(|r| r.parent_run_id.as_deref()))
        .bind(opt(|r| r.executor.as_deref()))
        .fetch_all(c)
        .await?;
    let mut stored: std::collections::HashMap<String, Run> = std::collections::HashMap::new();
    for row in &rows {
        let run = run_from_row(row)?;
        stored.insert(run.id.clone(), run);
    }
    Ok(batch
        .iter()
        .map(|q| {
            let run = stored
                .remove(&q.run.id)
                .ok_or_else(|| StoreError::Internal("a created run was not returned".into()))?;
            let event = RunEvent {
                run_id: run.id.clone(),
                seq: 1,
                kind: EventKind::Queued,
                data: queued_event_data(&run),
                at: q.run.created_at,
            };
            let claimed = (run.status == RunStatus::Running).then(|| ClaimedRun {
                run: run.clone(),
                checkpoint: None,
            });
            Ok(CreateOutcome::Created {
                run,
                event,
                claimed,
            })
        })
        .collect())
}

/// Reads runs by id in one statement: each `None` when there is no such run.
async fn get_runs<'c>(
    c: impl sqlx::PgExecutor<'c>,
    ids: &[String],
) -> Result<Vec<Result<Option<Run>, StoreError>>, StoreError> {
    let rows = sqlx::query(sql!("get_runs"))
        .bind(ids)
        .fetch_all(c)
        .await
        .map_err(db_err)?;
    let found: std::collections::HashMap<String, Run> =
        runs(rows)?.into_iter().map(|r| (r.id.clone(), r)).collect();
    // Several callers may ask for one run in one batch: each gets it.
    Ok(ids.iter().map(|id| Ok(found.get(id).cloned())).collect())
}

async fn start_attempt(
    c: &mut PgConnection,
    lease: &LeaseRef,
    start: &AttemptStart,
) -> Result<RunEvent, StoreError> {
    let held: Option<String> = sqlx::query_scalar(sql!("start_attempt"))
        .bind(&lease.run_id)
        .bind(&lease.owner)
        .bind(i64::from(lease.attempt))
        .bind(start.at)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    if held.is_none() {
        return Err(StoreError::LeaseLost);
    }
    let data = started_event_data(lease.attempt, &start.node);
    insert_event(c, &lease.run_id, EventKind::Started, &data, start.at).await
}

/// What each agent may still lease under the cluster-wide caps, counted under their lock
/// (held until the claim commits): (per agent left, in all left).
async fn cluster_room(
    c: &mut PgConnection,
    req: &ClaimRequest,
) -> Result<(std::collections::HashMap<String, usize>, Option<usize>), StoreError> {
    sqlx::query(sql!("cluster_caps_lock"))
        .execute(&mut *c)
        .await
        .map_err(db_err)?;
    let running: Vec<(String, i64)> = sqlx::query_as(sql!("running_by_agent"))
        .fetch_all(&mut *c)
        .await
        .map_err(db_err)?;
    let total: usize = running.iter().map(|(_, n)| *n as usize).sum();
    let per_agent = req
        .per_agent
        .iter()
        .map(|(agent, _)| {
            let here = running
                .iter()
                .find(|(a, _)| a == agent)
                .map_or(0, |(_, n)| *n as usize);
            let left = req
                .cluster
                .per_agent
                .map_or(usize::MAX, |cap| cap.saturating_sub(here));
            (agent.clone(), left)
        })
        .collect();
    Ok((
        per_agent,
        req.cluster.total.map(|cap| cap.saturating_sub(total)),
    ))
}

async fn claim_runs(c: &mut PgConnection, req: &ClaimRequest) -> Result<Claimed, StoreError> {
    let mut out = Claimed::default();
    let mut short = false;
    let (cluster_left, mut total_left) = if req.cluster.is_set() {
        cluster_room(c, req).await?
    } else {
        (Default::default(), None)
    };
    for (agent, asked) in &req.per_agent {
        let mut free = *asked;
        if let Some(left) = cluster_left.get(agent) {
            free = free.min(*left);
        }
        if let Some(left) = total_left {
            free = free.min(left);
        }
        let trimmed = free < *asked;
        // Runs left queued by a cap: when the next delayed one is due matters as well.
        short |= trimmed;
        if free == 0 {
            if trimmed && !out.held_back {
                out.held_back = sqlx::query_scalar(sql!("due_queued_exists"))
                    .bind(agent)
                    .bind(req.now)
                    .fetch_one(&mut *c)
                    .await
                    .map_err(db_err)?;
            }
            continue;
        }
        let free = &free;
        let mut room = agentry_core::runs::EntrypointRoom::default();
        let mut caps = req.caps_of(agent).peekable();
        if caps.peek().is_some() && !req.cluster.is_set() {
            // Counted under the caps' lock, so two nodes never pass a cap between them.
            sqlx::query(sql!("cluster_caps_lock"))
                .execute(&mut *c)
                .await
                .map_err(db_err)?;
        }
        for cap in caps {
            let running: i64 = sqlx::query_scalar(sql!("running_in_entrypoint"))
                .bind(agent)
                .bind(&cap.entrypoint)
                .fetch_one(&mut *c)
                .await
                .map_err(db_err)?;
            room.add(cap, running.max(0) as usize);
        }
        let candidates: Vec<(String, Option<String>, String)> =
            sqlx::query_as(sql!("claim_candidates"))
                .bind(agent)
                .bind(req.now)
                .bind(*free as i64)
                .bind(room.full())
                .fetch_all(&mut *c)
                .await
                .map_err(db_err)?;
        short |= candidates.len() < *free;
        // All the cap allowed were there: more may be waiting behind it.
        out.held_back |= trimmed && candidates.len() == *free;
        // Runs without a key are leased in one statement; a keyed one only under its key's lock.
        let mut batch = Vec::with_capacity(candidates.len());
        for (id, key, entrypoint) in candidates {
            if !room.take(&entrypoint) {
                continue;
            }
            match key {
                None => batch.push(id),
                Some(key) if key_is_free(c, &key, &id).await? => batch.push(id),
                Some(_) => short = true,
            }
        }
        out.held_back |= room.held_back();
        let leased = claim_batch(c, &batch, req).await?;
        if let Some(left) = total_left.as_mut() {
            *left = left.saturating_sub(leased.len());
        }
        out.runs.extend(leased);
    }
    if short {
        out.next_due = sqlx::query_scalar(sql!("next_due"))
            .bind(req.now)
            .fetch_one(&mut *c)
            .await
            .map_err(db_err)?;
    }
    Ok(out)
}

/// Takes the concurrency key's lock for this transaction and checks, under it, that the run is
/// still the key's next one and none of the key runs. `false` when another node holds the key.
async fn key_is_free(c: &mut PgConnection, key: &str, id: &str) -> Result<bool, StoreError> {
    let locked: bool = sqlx::query_scalar(sql!("claim_key_lock"))
        .bind(key)
        .fetch_one(&mut *c)
        .await
        .map_err(db_err)?;
    if !locked {
        return Ok(false);
    }
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *c)
        .await
        .map_err(db_err)?;
    sqlx::query_scalar(sql!("claim_key_free"))
        .bind(key)
        .bind(seq)
        .fetch_one(&mut *c)
        .await
        .map_err(db_err)
}

/// An attempt to end, and its start when that was not recorded yet.
pub(super) struct FinishRequest {
    lease: LeaseRef,
    outcome: Outcome,
    start: Option<AttemptStart>,
    now: i64,
}

/// Ends a batch of attempts (recording their starts first where given) in one call of
/// `agentry_finish_attempts`: one round trip and one commit. An attempt whose lease is lost
/// gets `LeaseLost`; the others are unaffected.
async fn finish_runs<'c>(
    c: impl sqlx::PgExecutor<'c>,
    batch: &[FinishRequest],
) -> Result<Vec<Result<Finished, StoreError>>, StoreError> {
    let ts: Vec<_> = batch
        .iter()
        .map(|q| transition(&q.outcome, q.lease.attempt, q.now))
        .collect();
    let started_data: Vec<Option<String>> = batch
        .iter()
        .map(|q| {
            q.start
                .as_ref()
                .map(|s| started_event_data(q.lease.attempt, &s.node))
        })
        .collect();
    let rows = sqlx::query(sql!("finish_run"))
        .bind(
            batch
                .iter()
                .map(|q| q.lease.run_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|q| q.lease.owner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|q| i64::from(q.lease.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|q| q.start.as_ref().map(|s| s.at))
                .collect::<Vec<_>>(),
        )
        .bind(
            started_data
                .iter()
                .map(|d| d.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(ts.iter().map(|t| t.status.as_str()).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.result).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.error).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.finished_at).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.run_at).collect::<Vec<_>>())
        .bind(batch.iter().map(|q| q.now).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.event.as_str()).collect::<Vec<_>>())
        .bind(ts.iter().map(|t| t.data.as_str()).collect::<Vec<_>>())
        .fetch_all(c)
        .await
        .map_err(db_err)?;
    // By position in the batch: one run may appear twice (a stale attempt still retrying its
    // end beside the current one), and each gets its own answer.
    let mut ended: Vec<Option<(Run, Option<i64>, i64)>> = (0..batch.len()).map(|_| None).collect();
    for row in &rows {
        let run = run_from_row(row).map_err(db_err)?;
        let started_seq: Option<i64> = row.try_get(25).map_err(db_err)?;
        let finished_seq: i64 = row.try_get(26).map_err(db_err)?;
        let position: i64 = row.try_get(27).map_err(db_err)?;
        if let Some(slot) = usize::try_from(position - 1)
            .ok()
            .and_then(|i| ended.get_mut(i))
        {
            *slot = Some((run, started_seq, finished_seq));
        }
    }
    Ok(batch
        .iter()
        .zip(ts)
        .zip(started_data)
        .zip(ended)
        .map(|(((q, t), data), ended)| {
            let (run, started_seq, finished_seq) = ended.ok_or(StoreError::LeaseLost)?;
            let mut events = Vec::with_capacity(2);
            if let (Some(start), Some(seq), Some(data)) = (&q.start, started_seq, data) {
                events.push(RunEvent {
                    run_id: run.id.clone(),
                    seq,
                    kind: EventKind::Started,
                    data,
                    at: start.at,
                });
            }
            events.push(RunEvent {
                run_id: run.id.clone(),
                seq: finished_seq,
                kind: t.event,
                data: t.data,
                at: q.now,
            });
            Ok(Finished { run, events })
        })
        .collect())
}

async fn cancel_run(c: &mut PgConnection, id: &str, now: i64) -> Result<CancelOutcome, StoreError> {
    let row = sqlx::query(sql!("cancel_queued"))
        .bind(id)
        .bind(CANCELLED_BEFORE_START)
        .bind(now)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    if let Some(run) = one_run(row)? {
        let data = format!(
            "{{\"attempt\":{},\"error\":{CANCELLED_BEFORE_START}}}",
            run.attempt
        );
        let event = insert_event(c, id, EventKind::Cancelled, &data, now).await?;
        return Ok(CancelOutcome::Cancelled(Finished {
            run,
            events: vec![event],
        }));
    }
    let row = sqlx::query(sql!("request_cancel"))
        .bind(id)
        .bind(now)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err)?;
    if let Some(run) = one_run(row)? {
        let event = insert_event(c, id, EventKind::CancelRequested, "{}", now).await?;
        return Ok(CancelOutcome::Requested {
            run,
            event: Some(event),
        });
    }
    Ok(match get_run(c, id).await? {
        Some(run) if run.status == RunStatus::Running => {
            CancelOutcome::Requested { run, event: None }
        }
        Some(run) => CancelOutcome::AlreadyFinished(run),
        None => CancelOutcome::NotFound,
    })
}

/// The most lost leases `lost_leases.sql` returns per round.
const LOST_PER_ROUND: usize = 500;

/// One round of the reaper: what it requeued (or ended), and how many lost leases it saw.
async fn recover_leases(
    c: &mut PgConnection,
    now: i64,
    node: Option<&(String, String)>,
    alive: &[LeaseRef],
) -> Result<(Vec<Finished>, usize), StoreError> {
    let (node_name, owner) = match node {
        Some((n, o)) => (Some(n.as_str()), Some(o.as_str())),
        None => (None, None),
    };
    // Expiry is judged on the database's clock, whatever this node's says (`now` is kept for
    // what the requeue writes).
    let rows = sqlx::query(sql!("lost_leases"))
        .bind(node_name)
        .bind(owner)
        .fetch_all(&mut *c)
        .await
        .map_err(db_err)?;
    let seen = rows.len();
    let mut out = Vec::new();
    for run in runs(rows)? {
        if LostAttempt::is_alive(&run, alive) {
            continue;
        }
        let lost = LostAttempt::of(&run, now);
        let row = sqlx::query(sql!("requeue_lost"))
            .bind(&run.id)
            .bind(now)
            .bind(lost.status.as_str())
            .bind(lost.error)
            .bind(lost.finished_at)
            .bind(&run.lease_owner)
            .bind(i64::from(run.attempt))
            .fetch_optional(&mut *c)
            .await
            .map_err(db_err)?;
        let Some(updated) = one_run(row)? else {
            continue;
        };
        let event = insert_event(c, &run.id, lost.event, &lost.data, now).await?;
        out.push(Finished {
            run: updated,
            events: vec![event],
        });
    }
    Ok((out, seen))
}

fn key_from_row(row: &PgRow) -> Result<ApiKey, StoreError> {
    let decode = |e: serde_json::Error| StoreError::Internal(format!("a stored key: {e}"));
    let scopes: String = row.try_get("scopes").map_err(db_err)?;
    let agents: Option<String> = row.try_get("agents").map_err(db_err)?;
    Ok(ApiKey {
        id: row.try_get("id").map_err(db_err)?,
        name: row.try_get("name").map_err(db_err)?,
        hash: row.try_get("hash").map_err(db_err)?,
        scopes: serde_json::from_str(&scopes).map_err(decode)?,
        agents: agents
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(decode)?,
        created_at: row.try_get("created_at").map_err(db_err)?,
        expires_at: row.try_get("expires_at").map_err(db_err)?,
        revoked_at: row.try_get("revoked_at").map_err(db_err)?,
        last_used_at: row.try_get("last_used_at").map_err(db_err)?,
    })
}

// ---------------------------------------------------------------------------------------------
// The traits
// ---------------------------------------------------------------------------------------------

/// Runs `op` in one transaction; an `Err` rolls it back.
macro_rules! in_tx {
    ($self:ident, |$c:ident| $body:expr) => {{
        let mut tx = $self.pool.begin().await.map_err(db_err)?;
        let result = {
            let $c: &mut PgConnection = &mut *tx;
            $body
        };
        match result {
            Ok(value) => {
                tx.commit().await.map_err(db_err)?;
                Ok(value)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }};
}

/// What a notification says, if it is about this schema.
fn change_of(schema: &str, channel: &str, payload: &str) -> Option<StoreChange> {
    let mut parts = payload.split(' ');
    if parts.next()? != schema {
        return None;
    }
    Some(match channel {
        "agentry_runs" => StoreChange::RunsDue,
        "agentry_cancels" => StoreChange::CancelRequested {
            run_id: parts.next()?.to_string(),
        },
        "agentry_events" => StoreChange::Events {
            run_id: parts.next()?.to_string(),
            seq: parts.next()?.parse().ok()?,
        },
        _ => return None,
    })
}

/// Listens on the channels and forwards what concerns this schema, until the receiver goes.
/// A lost connection is re-established (with backoff while the server is away) and reported as
/// `Missed`, since notifications sent meanwhile are gone.
async fn listen(
    pool: PgPool,
    schema: std::sync::Arc<str>,
    tx: tokio::sync::mpsc::Sender<StoreChange>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
            l.listen_all(CHANNELS).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot listen for other nodes' changes: {}", db_err(e));
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Whatever happened before this (re)connection is unknown.
        if tx.send(StoreChange::Missed).await.is_err() {
            return;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Some(change) = change_of(&schema, n.channel(), n.payload())
                        && tx.send(change).await.is_err()
                    {
                        return;
                    }
                }
                // The connection dropped (and was re-established): notifications were lost.
                Ok(None) => {
                    if tx.send(StoreChange::Missed).await.is_err() {
                        return;
                    }
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(_) => break,
            }
        }
    }
}

#[async_trait]
impl RunStore for PgStore {
    async fn register_node(
        &self,
        report: &NodeReport,
        gone_after_ms: i64,
    ) -> Result<bool, StoreError> {
        super::nodes::register(&self.pool, report, gone_after_ms).await
    }

    async fn report_node(&self, report: &NodeReport) -> Result<bool, StoreError> {
        super::nodes::report(&self.pool, report).await
    }

    async fn node_stopped(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        super::nodes::stopped(&self.pool, name, owner).await
    }

    async fn list_nodes(&self, gone_after_ms: i64) -> Result<Option<Vec<NodeRecord>>, StoreError> {
        super::nodes::list(&self.pool, gone_after_ms)
            .await
            .map(Some)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(db_err)
    }

    fn changes(&self) -> Option<StoreChanges> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(listen(
            self.pool.clone(),
            std::sync::Arc::clone(&self.schema),
            tx,
        ));
        Some(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        )))
    }

    async fn create_run(
        &self,
        run: NewRun,
        claim: Option<DirectClaim>,
    ) -> Result<CreateOutcome, StoreError> {
        let keyed = run.idempotency_key.is_some();
        let request = CreateRequest { run, claim };
        if !keyed {
            // Without a key: gathered with the other creations of the moment.
            let outcome = self.batches.creates.call(request).await?;
            self.created(&outcome);
            return Ok(outcome);
        }
        let key = request.run.idempotency_key.as_deref().unwrap_or_default();
        // A lost race for an idempotency key rolls back; the next try finds the winner's run.
        for _ in 0..3 {
            let mut tx = self.pool.begin().await.map_err(db_err)?;
            let outcome = match find_idempotent(&mut tx, &request.run, key).await {
                Ok(Some(found)) => Ok(Some(found)),
                Ok(None) => match insert_runs(&mut *tx, std::slice::from_ref(&request)).await {
                    Ok(mut one) => one.pop().transpose(),
                    Err(e) if is_unique_violation(&e) => Ok(None),
                    Err(e) => Err(db_err(e)),
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Some(outcome)) => {
                    tx.commit().await.map_err(db_err)?;
                    self.created(&outcome);
                    return Ok(outcome);
                }
                Ok(None) => {
                    let _ = tx.rollback().await;
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            }
        }
        Err(StoreError::Unavailable(
            "the idempotency key is being used by another request right now".into(),
        ))
    }

    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.batches.reads.call(id.to_string()).await
    }

    async fn list_runs(&self, q: RunQuery) -> Result<Vec<Run>, StoreError> {
        let rows = sqlx::query(sql!("list_runs"))
            .bind(&q.agent)
            .bind(q.status.map(RunStatus::as_str))
            .bind(&q.entrypoint)
            .bind(&q.concurrency_key)
            .bind(q.before_seq.unwrap_or(i64::MAX))
            .bind(q.limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        runs(rows)
    }

    async fn claim_runs(&self, request: ClaimRequest) -> Result<Claimed, StoreError> {
        in_tx!(self, |c| claim_runs(c, &request).await)
    }

    async fn renew_leases(
        &self,
        leases: Vec<LeaseRef>,
        until: i64,
        heartbeat: Vec<String>,
    ) -> Result<Vec<Renewal>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let ids: Vec<&str> = leases.iter().map(|l| l.run_id.as_str()).collect();
        let owners: Vec<&str> = leases.iter().map(|l| l.owner.as_str()).collect();
        let attempts: Vec<i64> = leases.iter().map(|l| i64::from(l.attempt)).collect();
        in_tx!(self, |c| {
            async {
                // Row locks in id order, as the batched ends take them (no deadlock cycle).
                sqlx::query(sql!("lock_runs"))
                    .bind(&ids)
                    .execute(&mut *c)
                    .await
                    .map_err(db_err)?;
                let held: Vec<(String, i64, bool)> = sqlx::query_as(sql!("renew_lease"))
                    .bind(&ids)
                    .bind(&owners)
                    .bind(&attempts)
                    .bind(until - now)
                    .bind(now)
                    .fetch_all(&mut *c)
                    .await
                    .map_err(db_err)?;
                let mut out = Vec::with_capacity(leases.len());
                for lease in &leases {
                    let found = held
                        .iter()
                        .find(|(id, attempt, _)| {
                            *id == lease.run_id && *attempt == i64::from(lease.attempt)
                        })
                        .map(|(_, _, cancel)| *cancel);
                    if found.is_some() && heartbeat.contains(&lease.run_id) {
                        let data = format!("{{\"attempt\":{}}}", lease.attempt);
                        insert_event(c, &lease.run_id, EventKind::Heartbeat, &data, now).await?;
                    }
                    out.push(Renewal {
                        run_id: lease.run_id.clone(),
                        attempt: lease.attempt,
                        held: found.is_some(),
                        cancel_requested: found.unwrap_or(false),
                    });
                }
                Ok(out)
            }
            .await
        })
    }

    async fn start_attempt(
        &self,
        lease: LeaseRef,
        start: AttemptStart,
    ) -> Result<RunEvent, StoreError> {
        let started: Result<RunEvent, StoreError> =
            in_tx!(self, |c| start_attempt(c, &lease, &start).await);
        if let Ok(e) = &started {
            self.notifier.events(std::slice::from_ref(e));
        }
        started
    }

    async fn append_events(
        &self,
        lease: LeaseRef,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let now = now_ms();
        let stored: Result<Vec<RunEvent>, StoreError> = in_tx!(self, |c| {
            async {
                if !holds_lease(c, &lease).await? {
                    return Err(StoreError::LeaseLost);
                }
                let mut stored = Vec::with_capacity(events.len());
                for e in &events {
                    stored
                        .push(insert_event(c, &lease.run_id, e.kind.clone(), &e.data, now).await?);
                }
                Ok(stored)
            }
            .await
        });
        if let Ok(events) = &stored {
            self.notifier.events(events);
        }
        stored
    }

    async fn save_checkpoint(
        &self,
        lease: LeaseRef,
        state: String,
    ) -> Result<RunEvent, StoreError> {
        let now = now_ms();
        let saved: Result<RunEvent, StoreError> = in_tx!(self, |c| {
            async {
                if !holds_lease(c, &lease).await? {
                    return Err(StoreError::LeaseLost);
                }
                let seq: i64 = sqlx::query_scalar(sql!("insert_checkpoint"))
                    .bind(&lease.run_id)
                    .bind(i64::from(lease.attempt))
                    .bind(&state)
                    .bind(now)
                    .fetch_one(&mut *c)
                    .await
                    .map_err(db_err)?;
                let data = checkpoint_event_data(seq, &state);
                insert_event(c, &lease.run_id, EventKind::Checkpoint, &data, now).await
            }
            .await
        });
        if let Ok(e) = &saved {
            self.notifier.events(std::slice::from_ref(e));
        }
        saved
    }

    async fn finish_run(
        &self,
        lease: LeaseRef,
        outcome: Outcome,
        start: Option<AttemptStart>,
    ) -> Result<Finished, StoreError> {
        let finished = self
            .batches
            .finishes
            .call(FinishRequest {
                lease,
                outcome,
                start,
                now: now_ms(),
            })
            .await;
        if let Ok(f) = &finished {
            self.notifier.finished(f);
        }
        finished
    }

    async fn cancel_run(&self, id: &str, now: i64) -> Result<CancelOutcome, StoreError> {
        let outcome: Result<CancelOutcome, StoreError> =
            in_tx!(self, |c| cancel_run(c, id, now).await);
        match &outcome {
            Ok(CancelOutcome::Cancelled(f)) => self.notifier.finished(f),
            Ok(CancelOutcome::Requested {
                run,
                event: Some(e),
            }) => {
                self.notifier.cancel(&run.id);
                self.notifier.events(std::slice::from_ref(e));
            }
            _ => {}
        }
        outcome
    }

    async fn last_event_seq(&self, id: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar(sql!("last_event_seq"))
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn run_links(
        &self,
        id: &str,
    ) -> Result<Option<agentry_core::runs::RunLinks>, StoreError> {
        let found: Option<(Option<String>, i32, Option<String>, Option<String>)> =
            sqlx::query_as(sql!("run_links"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(
            found.map(|(correlation_id, depth, parent_run_id, executor)| {
                agentry_core::runs::RunLinks {
                    correlation_id,
                    depth: u32::try_from(depth).unwrap_or(0),
                    parent_run_id,
                    executor,
                }
            }),
        )
    }

    async fn log_after(
        &self,
        after: agentry_core::events::EventCursor,
        limit: usize,
        agents: Option<Vec<String>>,
    ) -> Result<agentry_core::events::LogPage, StoreError> {
        use agentry_core::events::{EventCursor, LogPage, LoggedEvent};
        let rows = sqlx::query(sql!("log_after"))
            .bind(after.tx.to_string())
            .bind(after.gseq)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let mut page = LogPage {
            events: Vec::new(),
            next: after,
        };
        for row in &rows {
            let kind: String = row.try_get(4).map_err(db_err)?;
            let e = LoggedEvent {
                cursor: EventCursor {
                    tx: row.try_get::<i64, _>(0).map_err(db_err)?.max(0) as u64,
                    gseq: row.try_get(1).map_err(db_err)?,
                },
                event: RunEvent {
                    run_id: row.try_get(2).map_err(db_err)?,
                    seq: row.try_get(3).map_err(db_err)?,
                    kind: EventKind::parse(&kind),
                    data: row.try_get(5).map_err(db_err)?,
                    at: row.try_get(6).map_err(db_err)?,
                },
                agent: row.try_get(7).map_err(db_err)?,
                entrypoint: row.try_get(8).map_err(db_err)?,
                correlation_id: row.try_get(9).map_err(db_err)?,
                depth: row.try_get::<i32, _>(10).map_err(db_err)?.max(0) as u32,
            };
            page.next = e.cursor;
            if agents.as_ref().is_none_or(|a| a.contains(&e.agent)) {
                page.events.push(e);
            }
        }
        Ok(page)
    }

    async fn events_after(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let rows: Vec<(String, i64, String, String, i64)> = sqlx::query_as(sql!("events_after"))
            .bind(id)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|(run_id, seq, kind, data, at)| RunEvent {
                run_id,
                seq,
                kind: EventKind::parse(&kind),
                data,
                at,
            })
            .collect())
    }

    async fn recover_leases(
        &self,
        now: i64,
        node: Option<(String, String)>,
        alive: Vec<LeaseRef>,
    ) -> Result<Vec<Finished>, StoreError> {
        // Round after round while rounds come back full and requeue something (a restarted
        // node gets all its previous life's runs back at once), each in its own transaction.
        let mut all = Vec::new();
        for _ in 0..100 {
            let round: Result<(Vec<Finished>, usize), StoreError> =
                in_tx!(self, |c| recover_leases(c, now, node.as_ref(), &alive)
                    .await);
            let (requeued, seen) = round?;
            for f in &requeued {
                self.notifier.finished(f);
            }
            let more = seen == LOST_PER_ROUND && !requeued.is_empty();
            all.extend(requeued);
            if !more {
                break;
            }
        }
        Ok(all)
    }

    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        in_tx!(self, |c| {
            async {
                let ids: Vec<String> = sqlx::query_scalar(sql!("purge_candidates"))
                    .bind(before)
                    .bind(limit as i64)
                    .fetch_all(&mut *c)
                    .await
                    .map_err(db_err)?;
                for query in [
                    sql!("purge_events"),
                    sql!("purge_checkpoints"),
                    sql!("purge_callbacks"),
                    sql!("purge_run_links"),
                    sql!("purge_run"),
                ] {
                    sqlx::query(query)
                        .bind(&ids)
                        .execute(&mut *c)
                        .await
                        .map_err(db_err)?;
                }
                if !ids.is_empty() {
                    // The log's entries of the runs just purged (and of earlier ones), in
                    // bounded steps.
                    for _ in 0..10 {
                        let trimmed = sqlx::query(sql!("purge_event_log"))
                            .bind(10_000_i64)
                            .execute(&mut *c)
                            .await
                            .map_err(db_err)?
                            .rows_affected();
                        if trimmed < 10_000 {
                            break;
                        }
                    }
                }
                Ok(ids.len())
            }
            .await
        })
    }
}

#[async_trait]
impl KeyStore for PgStore {
    async fn create_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let encode = |e: serde_json::Error| StoreError::Internal(e.to_string());
        let scopes = serde_json::to_string(&key.scopes).map_err(encode)?;
        let agents = key
            .agents
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(encode)?;
        sqlx::query(sql!("insert_key"))
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.hash)
            .bind(scopes)
            .bind(agents)
            .bind(key.created_at)
            .bind(key.expires_at)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(sql!("list_keys"))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(sql!("revoke_key"))
            .bind(id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn touch_keys(&self, mut used: Vec<(String, i64)>) -> Result<(), StoreError> {
        // In one order on every node, so that two nodes' flushes never deadlock.
        used.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        in_tx!(self, |c| {
            async {
                for (id, at) in &used {
                    sqlx::query(sql!("touch_key"))
                        .bind(id)
                        .bind(at)
                        .execute(&mut *c)
                        .await
                        .map_err(db_err)?;
                }
                Ok(())
            }
            .await
        })
    }
}

/// The batched statements' answers, on a real PostgreSQL (`AGENTRY_TEST_POSTGRES_URL`, else
/// 127.0.0.1:5432/test), each test in a schema of its own.
#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (PgStore, String) {
        let schema = format!("agentry_ut_{}", uuid::Uuid::new_v4().simple());
        let store = PgStore::connect(&PgOptions {
            url: std::env::var("AGENTRY_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            batches_in_flight: 1,
            schema: Some(schema.clone()),
        })
        .await
        .expect("PostgreSQL (start it: .ci/run does)");
        (store, schema)
    }

    async fn drop_schema(store: &PgStore, schema: &str) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(store.pool())
            .await;
    }

    fn new_run(id: &str) -> NewRun {
        let now = now_ms();
        NewRun {
            id: id.into(),
            agent: "a".into(),
            entrypoint: "e".into(),
            input: "{}".into(),
            idempotency_key: None,
            idempotency_scope: String::new(),
            request_hash: None,
            priority: 0,
            run_at: now,
            timeout_ms: 1000,
            max_attempts: 5,
            backoff: Backoff::default(),
            concurrency_key: None,
            metadata: "{}".into(),
            callback_url: None,
            correlation_id: None,
            depth: 0,
            parent_run_id: None,
            executor: None,
            created_at: now,
        }
    }

    fn claim(owner: &str) -> ClaimRequest {
        let now = now_ms();
        ClaimRequest {
            node: "n".into(),
            owner: owner.into(),
            now,
            lease_until: now + 60_000,
            per_agent: vec![("a".into(), 1)],
            cluster: Default::default(),
            entrypoint_caps: Vec::new(),
        }
    }

    /// Two attempts of one run in one batch (a stale one still retrying its end beside the
    /// current one): the stale one is refused, the current one ends the run, and each gets
    /// its own answer; the log's numbers stay unique.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_with_two_attempts_of_one_run_answers_each_by_position() {
        let (store, schema) = store().await;
        store.create_run(new_run("r1"), None).await.expect("create");
        let first = store.claim_runs(claim("n/1")).await.expect("claim").runs;
        assert_eq!(first.len(), 1);
        // Attempt 1's lease is handed back (as by a reaper), and the run is claimed again.
        store
            .recover_leases(now_ms(), Some(("n".into(), "n/other".into())), Vec::new())
            .await
            .expect("requeue");
        let second = store.claim_runs(claim("n/1")).await.expect("claim").runs;
        assert_eq!(second[0].run.attempt, 2);
        let end = |attempt: u32| FinishRequest {
            lease: LeaseRef {
                run_id: "r1".into(),
                owner: "n/1".into(),
                attempt,
            },
            outcome: Outcome::Succeeded {
                result: format!("{attempt}"),
            },
            start: Some(AttemptStart {
                at: now_ms(),
                node: "n".into(),
            }),
            now: now_ms(),
        };
        let answers = finish_runs(store.pool(), &[end(1), end(2)])
            .await
            .expect("batch");
        assert!(
            matches!(answers[0], Err(StoreError::LeaseLost)),
            "{:?}",
            answers[0].as_ref().err()
        );
        let ended = answers[1]
            .as_ref()
            .expect("the current attempt ends the run");
        assert_eq!(ended.run.attempt, 2);
        assert_eq!(ended.run.result.as_deref(), Some("2"));
        let events = store.events_after("r1", 0, 100).await.expect("events");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
        assert_eq!(
            ended.events.last().map(|e| e.seq),
            seqs.last().copied(),
            "the answer names the log's last event"
        );
        drop_schema(&store, &schema).await;
    }

    /// One run asked for twice in one batch of reads: both callers get it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_batch_answers_every_caller_of_one_run() {
        let (store, schema) = store().await;
        store.create_run(new_run("r1"), None).await.expect("create");
        let answers = get_runs(store.pool(), &["r1".into(), "r1".into(), "nope".into()])
            .await
            .expect("batch");
        assert_eq!(answers.len(), 3);
        assert_eq!(
            answers[0]
                .as_ref()
                .ok()
                .and_then(|r| r.as_ref())
                .map(|r| r.id.as_str()),
            Some("r1")
        );
        assert_eq!(
            answers[1]
                .as_ref()
                .ok()
                .and_then(|r| r.as_ref())
                .map(|r| r.id.as_str()),
            Some("r1")
        );
        assert!(matches!(answers[2], Ok(None)));
        drop_schema(&store, &schema).await;
    }
}
