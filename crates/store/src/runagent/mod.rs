//! RunAgent's local database (`$RUNAGENT_CACHE_DIR/runagent_local.db`, default
//! `~/.runagent/runagent_local.db`): the `agents` discovery row and the invocation history.
//!
//! RunAgent's legacy `agent_runs` table is created but not written: RunAgent writes it and
//! nothing in RunAgent reads it, and skipping it halves the history's cost.
//!
//! Nothing here is on the request path. Invocations are queued to one writer task that commits
//! at most every 200 ms, all rows in one statement of one transaction (WAL,
//! `synchronous=NORMAL`); a full queue drops history rather than slowing calls, and reading the
//! history first commits what is queued. The history is kept within its bounds (rows, age) by
//! the same writer, in small deletes after each batch and every few seconds when idle.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::{AgentConfig, Invocation, InvocationHistory};
use async_trait::async_trait;
use chrono::{NaiveDateTime, Utc};
use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

const SCHEMA: &str = include_str!("schema.sql");
/// How RunAgent writes times (UTC, microseconds): text of one width, which sorts.
pub(crate) const TIMESTAMP: &str = "%Y-%m-%d %H:%M:%S%.6f";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the invocation log writer has stopped")]
    WriterGone,
}

/// The RunAgent database.
#[derive(Clone)]
pub struct RunAgentDb {
    pool: SqlitePool,
    path: PathBuf,
}

impl RunAgentDb {
    /// Where RunAgent keeps it: `$RUNAGENT_CACHE_DIR`, else `~/.runagent`.
    pub fn default_path() -> PathBuf {
        let dir = std::env::var_os("RUNAGENT_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".runagent")))
            .unwrap_or_else(|| PathBuf::from(".runagent"));
        dir.join("runagent_local.db")
    }

    /// Opens (creating if needed) the database and its tables.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::CreateDir(dir.to_path_buf(), e))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            // A batch of history rows touches many index pages; a page cache that holds them
            // keeps SQLite from spilling dirty pages to the WAL before the commit.
            .pragma("cache_size", "-16384");
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self {
            pool,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ports recorded for any agent (RunAgent never reuses one without `--port`).
    pub async fn recorded_ports(&self) -> Result<HashSet<u16>, StoreError> {
        let rows = sqlx::query("SELECT port FROM agents")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<i64, _>(0).ok())
            .filter_map(|p| u16::try_from(p).ok())
            .collect())
    }

    /// Records that `agent` is being served at `host:port` (creating its row if RunAgent never
    /// registered it), exactly the fields RunAgent's `serve` updates.
    pub async fn register_serving(
        &self,
        agent: &AgentConfig,
        host: &str,
        port: u16,
    ) -> Result<(), StoreError> {
        let now = Utc::now().naive_utc().format(TIMESTAMP).to_string();
        sqlx::query(
            "INSERT INTO agents (agent_id, agent_path, host, port, framework, status, remote_status, is_local,
                deployed_at, run_count, success_count, error_count, created_at, updated_at, agent_name,
                description, template, version, initialized_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'serving', 'initialized', 1, ?6, 0, 0, 0, ?6, ?6, ?7, ?8, ?9, ?10, ?6)
             ON CONFLICT (agent_id) DO UPDATE SET host = excluded.host, port = excluded.port,
                framework = excluded.framework, status = 'serving', agent_path = excluded.agent_path,
                deployed_at = excluded.deployed_at, updated_at = excluded.updated_at",
        )
        .bind(&agent.agent_id)
        .bind(agent.dir.display().to_string())
        .bind(host)
        .bind(i64::from(port))
        .bind(&agent.framework)
        .bind(&now)
        .bind(&agent.agent_name)
        .bind(&agent.description)
        .bind(&agent.template)
        .bind(&agent.version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `GET /api/v1/agents/{id}/invocations`: newest first.
    pub async fn list_invocations(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT invocation_id, agent_id, input_data, output_data, error_detail, request_timestamp,
                    response_timestamp, execution_time_ms, status, entrypoint_tag, sdk_type, client_info
             FROM agent_invocations WHERE agent_id = ?1 AND (?2 IS NULL OR status = ?2)
             ORDER BY request_timestamp DESC LIMIT ?3",
        )
        .bind(agent_id)
        .bind(status)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(invocation_json).collect())
    }

    /// `GET /api/v1/invocations/{id}`.
    pub async fn invocation(&self, invocation_id: &str) -> Result<Option<Value>, StoreError> {
        let row = sqlx::query(
            "SELECT invocation_id, agent_id, input_data, output_data, error_detail, request_timestamp,
                    response_timestamp, execution_time_ms, status, entrypoint_tag, sdk_type, client_info
             FROM agent_invocations WHERE invocation_id = ?1",
        )
        .bind(invocation_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(invocation_json))
    }

    /// `GET /api/v1/agents/{id}/invocations/stats`.
    pub async fn invocation_stats(&self, agent_id: &str) -> Result<Value, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*),
                    COALESCE(SUM(status = 'completed'), 0),
                    COALESCE(SUM(status = 'failed'), 0),
                    COALESCE(SUM(status = 'pending'), 0),
                    AVG(CASE WHEN status = 'completed' THEN execution_time_ms END)
             FROM agent_invocations WHERE agent_id = ?1",
        )
        .bind(agent_id)
        .fetch_one(&self.pool)
        .await?;
        let counts = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        Ok(stats_json(agent_id, counts, row.try_get(4)?))
    }

    /// Adds a batch's calls to the `agents` rows' counters (RunAgent's CLI shows them).
    pub(crate) async fn add_counters(
        &self,
        counters: &HashMap<String, (i64, i64, i64, String)>,
    ) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        add_counters(&mut conn, counters).await
    }
}

/// Starts the batching writer into `backend`; record invocations through the returned handle.
fn start_invocation_log(
    backend: Arc<dyn HistoryBackend>,
    capacity: usize,
    bounds: HistoryBounds,
) -> InvocationLog {
    let (tx, rx) = mpsc::channel(capacity.max(16));
    tokio::spawn(write_invocations(backend, rx, bounds));
    InvocationLog { tx }
}

/// Where the invocation history is kept: RunAgent's own SQLite file ([`RunAgentDb`]), or the
/// run store's PostgreSQL database, shared by every node on it (`crate::postgres::PgHistory`).
/// The writer batches, prunes and flushes the same way into either.
#[async_trait]
pub(crate) trait HistoryBackend: Send + Sync + 'static {
    /// Stores a batch of rows (and counts them in the `agents` rows, where those are kept).
    async fn write(&self, batch: &EncodedBatch) -> Result<(), sqlx::Error>;
    /// Deletes up to `limit` rows beyond the bounds, oldest first; how many went.
    async fn prune(&self, bounds: &HistoryBounds, limit: i64) -> Result<u64, sqlx::Error>;
    async fn list(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, sqlx::Error>;
    async fn get(&self, invocation_id: &str) -> Result<Option<Value>, sqlx::Error>;
    async fn stats(&self, agent_id: &str) -> Result<Value, sqlx::Error>;
}

#[async_trait]
impl HistoryBackend for RunAgentDb {
    async fn write(&self, batch: &EncodedBatch) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        insert_batch(&mut tx, batch).await?;
        tx.commit().await
    }

    async fn prune(&self, bounds: &HistoryBounds, limit: i64) -> Result<u64, sqlx::Error> {
        prune(&self.pool, bounds, limit).await
    }

    async fn list(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, sqlx::Error> {
        self.list_invocations(agent_id, status, limit)
            .await
            .map_err(into_sqlx)
    }

    async fn get(&self, invocation_id: &str) -> Result<Option<Value>, sqlx::Error> {
        self.invocation(invocation_id).await.map_err(into_sqlx)
    }

    async fn stats(&self, agent_id: &str) -> Result<Value, sqlx::Error> {
        self.invocation_stats(agent_id).await.map_err(into_sqlx)
    }
}

fn into_sqlx(e: StoreError) -> sqlx::Error {
    match e {
        StoreError::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

fn invocation_json(row: &sqlx::sqlite::SqliteRow) -> Value {
    invocation_json_from(
        &|i| row.try_get::<Option<String>, _>(i).ok().flatten(),
        row.try_get::<Option<f64>, _>(7).ok().flatten(),
    )
}

/// RunAgent's JSON object of one history row, from its columns in RunAgent's order (`text`)
/// and its execution time: the same from every database the history is kept in.
pub(crate) fn invocation_json_from(
    text: &dyn Fn(usize) -> Option<String>,
    execution_time_ms: Option<f64>,
) -> Value {
    let parsed =
        |i: usize| text(i).map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::String(t)));
    let iso = |i: usize| {
        text(i).map(|t| {
            NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.f")
                .map(agentry_core::time::python_isoformat)
                .unwrap_or(t)
        })
    };
    json!({
        "invocation_id": text(0),
        "agent_id": text(1),
        "input_data": parsed(2),
        "output_data": parsed(3),
        "error_detail": text(4),
        "request_timestamp": iso(5),
        "response_timestamp": iso(6),
        "execution_time_ms": execution_time_ms,
        "status": text(8),
        "entrypoint_tag": text(9),
        "sdk_type": text(10),
        "client_info": parsed(11),
    })
}

/// RunAgent's stats object for an agent, from the counts and the completed calls' mean time.
pub(crate) fn stats_json(
    agent_id: &str,
    (total, completed, failed, pending): (i64, i64, i64, i64),
    avg: Option<f64>,
) -> Value {
    let success_rate = if total > 0 {
        (completed as f64 / total as f64 * 100.0 * 100.0).round() / 100.0
    } else {
        0.0
    };
    json!({
        "total_invocations": total,
        "completed_invocations": completed,
        "failed_invocations": failed,
        "pending_invocations": pending,
        "success_rate": if total > 0 { json!(success_rate) } else { json!(0) },
        "avg_execution_time_ms": avg.filter(|_| completed > 0).map(|a| (a * 100.0).round() / 100.0),
        "agent_id": agent_id,
    })
}

enum LogCommand {
    Record(Box<Invocation>),
    Flush(oneshot::Sender<()>),
}

/// Queues invocations for the batching writer. Cheap to clone.
#[derive(Clone)]
pub struct InvocationLog {
    tx: mpsc::Sender<LogCommand>,
}

impl InvocationLog {
    /// Queues a record without waiting. Returns false (and the record is dropped) when the
    /// queue is full: history is best-effort, calls are not.
    pub fn record(&self, invocation: Invocation) -> bool {
        self.tx
            .try_send(LogCommand::Record(Box::new(invocation)))
            .is_ok()
    }

    /// Waits until everything queued so far is committed (reads call this first, so that the
    /// history endpoints see every finished call).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(LogCommand::Flush(tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)
    }
}

/// Longest a finished call waits before its history row is committed (reads flush at once).
const COMMIT_EVERY: Duration = Duration::from_millis(200);
const MAX_BATCH: usize = 2048;
/// Rows pruned per round at least; a round also prunes twice what the batch before it added,
/// so pruning keeps up with any write rate while each delete stays short.
const PRUNE_BATCH: i64 = 5_000;
/// How often an idle writer prunes (an old, oversized history shrinks even with no calls).
const PRUNE_IDLE_EVERY: Duration = Duration::from_secs(5);
/// Least time between two prunes of a busy writer: each walks the oldest rows (the row bound
/// in rowid order, the age bound by the timestamp index), so they are not run per batch.
const PRUNE_BUSY_EVERY: Duration = Duration::from_secs(1);

/// How much invocation history is kept: at most `max_rows` rows, none older than `max_age`.
/// Only rows of `agents` (the ids served here) are ever deleted: RunAgent's database is shared
/// with RunAgent itself and with other servers, whose rows are not ours to prune.
#[derive(Debug, Clone, Default)]
pub struct HistoryBounds {
    pub max_rows: Option<u64>,
    pub max_age: Option<Duration>,
    pub agents: Vec<String>,
}

/// Deletes up to `limit` rows beyond the bounds, oldest first; returns how many went.
async fn prune(pool: &SqlitePool, bounds: &HistoryBounds, limit: i64) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    let ours = Value::from(bounds.agents.clone()).to_string();
    if let Some(max_rows) = bounds.max_rows {
        // Rowids grow with every insert (`INSERT OR REPLACE` included), so the newest
        // `max_rows` rows are those above `max(rowid) - max_rows`.
        deleted += sqlx::query(
            "DELETE FROM agent_invocations WHERE rowid IN (SELECT rowid FROM agent_invocations NOT INDEXED
                WHERE rowid <= (SELECT max(rowid) FROM agent_invocations) - ?1
                  AND agent_id IN (SELECT value FROM json_each(?3))
                ORDER BY rowid LIMIT ?2)",
        )
        .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
        .bind(limit)
        .bind(ours.as_str())
        .execute(pool)
        .await?
        .rows_affected();
    }
    if let Some(max_age) = bounds.max_age {
        let cutoff = Utc::now().naive_utc()
            - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        deleted += sqlx::query(
            "DELETE FROM agent_invocations WHERE rowid IN (SELECT rowid FROM agent_invocations
                INDEXED BY idx_invocations_request_timestamp
                WHERE request_timestamp < ?1 AND agent_id IN (SELECT value FROM json_each(?3))
                LIMIT ?2)",
        )
        .bind(cutoff.format(TIMESTAMP).to_string())
        .bind(limit)
        .bind(ours.as_str())
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(deleted)
}

async fn write_invocations(
    backend: Arc<dyn HistoryBackend>,
    mut rx: mpsc::Receiver<LogCommand>,
    bounds: HistoryBounds,
) {
    let mut batch: Vec<Invocation> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut added_since_prune: i64 = 0;
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let first = match tokio::time::timeout(PRUNE_IDLE_EVERY, rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(_) => {
                if let Err(e) = backend.prune(&bounds, PRUNE_BATCH).await {
                    tracing::warn!("could not prune invocation history: {e}");
                }
                last_prune = tokio::time::Instant::now();
                continue;
            }
        };
        // Gather for up to COMMIT_EVERY, so that one commit carries many rows at any load;
        // a flush request (someone reading the history) commits at once.
        let deadline = tokio::time::Instant::now() + COMMIT_EVERY;
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(LogCommand::Record(inv)) => batch.push(*inv),
                Some(LogCommand::Flush(tx)) => flushes.push(tx),
                None => {}
            }
            if !flushes.is_empty() || batch.len() >= MAX_BATCH {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(cmd)) => next = Some(cmd),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let rows = batch.len();
            // Encoding thousands of rows takes milliseconds: not on the threads serving requests.
            let taken = std::mem::take(&mut batch);
            let result = match tokio::task::spawn_blocking(move || encode_batch(taken)).await {
                Ok(encoded) => backend.write(&encoded).await,
                Err(e) => Err(sqlx::Error::Protocol(format!(
                    "encoding the batch failed: {e}"
                ))),
            };
            if let Err(e) = result {
                tracing::warn!(rows, "could not record invocation history: {e}");
            }
            added_since_prune = added_since_prune.saturating_add(i64::try_from(rows).unwrap_or(0));
        }
        // Off the request path, after a batch: a full disk here costs history, never calls.
        // A read (a flush) sees the history within its bounds.
        if last_prune.elapsed() >= PRUNE_BUSY_EVERY || !flushes.is_empty() {
            let limit = PRUNE_BATCH.max(added_since_prune.saturating_mul(2));
            if let Err(e) = backend.prune(&bounds, limit).await {
                tracing::warn!("could not prune invocation history: {e}");
            }
            added_since_prune = 0;
            last_prune = tokio::time::Instant::now();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

/// One statement inserts a whole batch: the rows travel as one JSON array parameter that
/// SQLite unpacks itself, so per-row cost stays inside SQLite instead of in per-value binding.
const INSERT_INVOCATIONS: &str = "INSERT OR REPLACE INTO agent_invocations (invocation_id, agent_id, input_data,
        output_data, error_detail, request_timestamp, response_timestamp, execution_time_ms, status, entrypoint_tag,
        sdk_type, client_info)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7,
        value ->> 8, value ->> 9, value ->> 10, value ->> 11
    FROM json_each(?1)";

/// A batch ready to write: its rows as one JSON array, and per-agent counters.
pub(crate) struct EncodedBatch {
    /// The rows, each an array of RunAgent's columns in order.
    pub(crate) rows_json: String,
    /// Per agent: calls, completed, failed, the latest response time.
    pub(crate) counters: HashMap<String, (i64, i64, i64, String)>,
}

pub(crate) fn encode_batch(batch: Vec<Invocation>) -> EncodedBatch {
    let mut counters: HashMap<String, (i64, i64, i64, String)> = HashMap::new();
    let mut rows = Vec::with_capacity(batch.len());
    for inv in batch {
        let request = inv.request_timestamp.format(TIMESTAMP).to_string();
        let response = inv.response_timestamp.format(TIMESTAMP).to_string();
        let c = counters
            .entry(inv.agent_id.clone())
            .or_insert((0, 0, 0, String::new()));
        c.0 += 1;
        if inv.status == "completed" {
            c.1 += 1;
        } else {
            c.2 += 1;
        }
        if response > c.3 {
            c.3.clone_from(&response);
        }
        rows.push(json!([
            inv.invocation_id,
            inv.agent_id,
            inv.input_data,
            inv.output_data,
            inv.error_detail,
            request,
            response,
            inv.execution_time_ms,
            inv.status,
            inv.entrypoint_tag,
            inv.sdk_type,
            inv.client_info,
        ]));
    }
    EncodedBatch {
        rows_json: Value::Array(rows).to_string(),
        counters,
    }
}

async fn insert_batch(
    conn: &mut SqliteConnection,
    batch: &EncodedBatch,
) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_INVOCATIONS)
        .bind(batch.rows_json.as_str())
        .execute(&mut *conn)
        .await?;
    add_counters(conn, &batch.counters).await
}

async fn add_counters(
    conn: &mut SqliteConnection,
    counters: &HashMap<String, (i64, i64, i64, String)>,
) -> Result<(), sqlx::Error> {
    for (agent_id, (runs, ok, failed, last)) in counters {
        sqlx::query(
            "UPDATE agents SET run_count = COALESCE(run_count, 0) + ?2, success_count = COALESCE(success_count, 0) + ?3,
                error_count = COALESCE(error_count, 0) + ?4, last_run = ?5 WHERE agent_id = ?1",
        )
        .bind(agent_id)
        .bind(runs)
        .bind(ok)
        .bind(failed)
        .bind(last)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// RunAgent's invocation history: where it is kept, and the writer that batches records into
/// it.
pub struct History {
    backend: Arc<dyn HistoryBackend>,
    log: InvocationLog,
}

impl History {
    /// In RunAgent's database: starts the batching writer (its queue holds `capacity`
    /// records), keeping the history within `bounds`.
    pub fn start(db: RunAgentDb, capacity: usize, bounds: HistoryBounds) -> Self {
        Self::start_in(Arc::new(db), capacity, bounds)
    }

    /// In the run store's PostgreSQL database, shared by the nodes on it: every node's calls
    /// are listed by every node.
    pub fn start_shared(
        history: crate::postgres::PgHistory,
        capacity: usize,
        bounds: HistoryBounds,
    ) -> Self {
        Self::start_in(Arc::new(history), capacity, bounds)
    }

    fn start_in(backend: Arc<dyn HistoryBackend>, capacity: usize, bounds: HistoryBounds) -> Self {
        let log = start_invocation_log(Arc::clone(&backend), capacity, bounds);
        Self { backend, log }
    }
}

fn unavailable(e: sqlx::Error) -> agentry_core::StoreError {
    agentry_core::StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl InvocationHistory for History {
    fn record(&self, invocation: Invocation) -> bool {
        self.log.record(invocation)
    }

    async fn list(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, agentry_core::StoreError> {
        self.flush().await;
        self.backend
            .list(agent_id, status, limit)
            .await
            .map_err(unavailable)
    }

    async fn get(&self, invocation_id: &str) -> Result<Option<Value>, agentry_core::StoreError> {
        self.flush().await;
        self.backend.get(invocation_id).await.map_err(unavailable)
    }

    async fn stats(&self, agent_id: &str) -> Result<Value, agentry_core::StoreError> {
        self.flush().await;
        self.backend.stats(agent_id).await.map_err(unavailable)
    }

    async fn flush(&self) {
        let _ = self.log.flush().await;
    }
}
