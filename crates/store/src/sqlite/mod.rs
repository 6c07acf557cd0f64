//! The embedded SQLite run store: one file in the state directory, WAL mode.
//!
//! SQLite takes one writer at a time, so every write goes to one dedicated thread that owns the
//! write connection and commits **groups**: it takes every job that is waiting, runs each inside
//! its own savepoint of one `BEGIN IMMEDIATE` transaction, commits once (one fsync with
//! `synchronous=FULL`), and only then answers the callers. Under load many runs share a commit;
//! when idle a job commits alone at once. A job whose SQL fails makes the group roll back and
//! replay one job per transaction, so one bad job never fails its neighbours. Reads run on a
//! small pool of read-only connections on the blocking thread pool and never wait for the
//! writer (WAL). The SQL is in `queries/*.sql` and `migrations/*.sql`, one statement per file.

mod callbacks;
mod ops;
mod schedules;
mod triggers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use agentry_core::keys::ApiKey;
use agentry_core::runs::{
    AttemptStart, CancelOutcome, ClaimRequest, Claimed, CreateOutcome, DirectClaim, Finished,
    LeaseRef, NewEvent, NewRun, Outcome, Renewal, Run, RunEvent, RunQuery, now_ms,
};
use agentry_core::store::{KeyStore, RunStore, StoreError};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::oneshot;

/// Schema migrations, in order; `PRAGMA user_version` records how many were applied.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_runs.sql"),
    include_str!("migrations/0002_api_keys.sql"),
    include_str!("migrations/0003_idempotency_scope.sql"),
    include_str!("migrations/0004_schedules.sql"),
    include_str!("migrations/0005_callbacks.sql"),
    include_str!("migrations/0006_event_log.sql"),
    include_str!("migrations/0007_triggers.sql"),
];

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced; survives power loss.
    Full,
    /// `synchronous=NORMAL`: survives a crash of the process, not of the machine.
    Normal,
}

/// Options of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// How long a write waits for a lock held by another process before failing with 503.
    pub busy_timeout: Duration,
    /// Most jobs committed together.
    pub max_group: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(5),
            max_group: 512,
        }
    }
}

/// The SQLite implementation of [`RunStore`]. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    jobs: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    readers: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations and starts the
    /// writer thread.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let writer = open_connection(path, &options, false).map_err(map_err)?;
        migrate(&writer).map_err(map_err)?;
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let max_group = options.max_group.max(1);
        std::thread::Builder::new()
            .name("agentry-sqlite-writer".into())
            .spawn(move || write_loop(writer, rx, max_group))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                options,
                jobs: Mutex::new(Some(tx)),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the writer after the jobs already queued (at shutdown).
    pub fn close(&self) {
        self.inner.jobs.lock().take();
    }

    /// Runs `f` in the writer's next group commit; resolves once committed.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> rusqlite::Result<Result<T, StoreError>> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(TypedJob {
            f,
            out: None,
            reply,
        });
        {
            let jobs = self.inner.jobs.lock();
            let sender = jobs
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
            sender
                .send(job)
                .map_err(|_| StoreError::Internal("the writer thread stopped".into()))?;
        }
        rx.await
            .map_err(|_| StoreError::Internal("the writer thread stopped".into()))?
    }

    /// Runs `f` on a read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().pop() {
                Some(c) => c,
                None => open_connection(&inner.path, &inner.options, true).map_err(map_err)?,
            };
            let out = f(&conn).map_err(map_err);
            let mut readers = inner.readers.lock();
            if readers.len() < 8 {
                readers.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Internal(format!("a read task failed: {e}")))?
    }
}

fn open_connection(
    path: &Path,
    options: &SqliteOptions,
    read_only: bool,
) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(options.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match options.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    if read_only {
        conn.pragma_update(None, "query_only", true)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Maps SQLite's failures onto the store's: what a client may retry is `Unavailable`.
fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                StoreError::Unavailable("the database is locked by another process".into())
            }
            ErrorCode::DiskFull => StoreError::Unavailable("the disk is full".into()),
            ErrorCode::SystemIoFailure | ErrorCode::CannotOpen | ErrorCode::ReadOnly => {
                StoreError::Unavailable(format!("the database cannot be written: {e}"))
            }
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A unit of work for the writer thread.
trait Job: Send {
    /// Runs inside the group's transaction, in its own savepoint. An `Err` is an SQL failure
    /// that aborts the group; the job's own refusals are kept for `complete`.
    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()>;
    fn complete(self: Box<Self>);
    fn fail(self: Box<Self>, err: StoreError);
}

struct TypedJob<T, F> {
    f: F,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> rusqlite::Result<Result<T, StoreError>> + Send,
{
    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        conn.prepare_cached("SAVEPOINT job")?.execute([])?;
        let out = (self.f)(conn)?;
        if out.is_err() {
            // A refused job (lease lost, conflict) leaves no trace.
            conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
        }
        conn.prepare_cached("RELEASE job")?.execute([])?;
        self.out = Some(out);
        Ok(())
    }

    fn complete(self: Box<Self>) {
        let out = self
            .out
            .unwrap_or_else(|| Err(StoreError::Internal("a job was not run".into())));
        let _ = self.reply.send(out);
    }

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

fn write_loop(conn: Connection, rx: mpsc::Receiver<Box<dyn Job>>, max_group: usize) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        match commit_group(&conn, &mut group) {
            Ok(()) => group.into_iter().for_each(|j| j.complete()),
            Err(e) if group.len() == 1 => {
                if let Some(job) = group.pop() {
                    job.fail(map_err(e));
                }
            }
            Err(e) => {
                let err = map_err(e);
                // A locked database, a full disk or an I/O error fails every job alike:
                // all of them fail at once, instead of each replay waiting out its own busy
                // timeout. Anything else is one job's SQL: find it, each job again alone.
                if matches!(err, StoreError::Unavailable(_)) {
                    for job in group {
                        job.fail(err.clone());
                    }
                    continue;
                }
                for mut job in group {
                    match commit_group(&conn, std::slice::from_mut(&mut job)) {
                        Ok(()) => job.complete(),
                        Err(e) => job.fail(map_err(e)),
                    }
                }
            }
        }
    }
    tracing::debug!("the SQLite writer stopped");
}

fn commit_group(conn: &Connection, group: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let mut result = group.iter_mut().try_for_each(|job| job.run(conn));
    if result.is_ok() {
        result = conn.prepare_cached("COMMIT")?.execute([]).map(|_| ());
    }
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn create_run(
        &self,
        run: NewRun,
        claim: Option<DirectClaim>,
    ) -> Result<CreateOutcome, StoreError> {
        self.write(move |c| ops::create_run(c, &run, claim.as_ref()))
            .await
    }

    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let id = id.to_string();
        self.read(move |c| ops::get_run(c, &id)).await
    }

    async fn list_runs(&self, query: RunQuery) -> Result<Vec<Run>, StoreError> {
        self.read(move |c| ops::list_runs(c, &query)).await
    }

    async fn claim_runs(&self, request: ClaimRequest) -> Result<Claimed, StoreError> {
        self.write(move |c| ops::claim_runs(c, &request).map(Ok))
            .await
    }

    async fn renew_leases(
        &self,
        leases: Vec<LeaseRef>,
        until: i64,
        heartbeat: Vec<String>,
    ) -> Result<Vec<Renewal>, StoreError> {
        self.write(move |c| ops::renew_leases(c, &leases, until, &heartbeat, now_ms()).map(Ok))
            .await
    }

    async fn append_events(
        &self,
        lease: LeaseRef,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RunEvent>, StoreError> {
        self.write(move |c| ops::append_events(c, &lease, &events, now_ms()))
            .await
    }

    async fn save_checkpoint(
        &self,
        lease: LeaseRef,
        state: String,
    ) -> Result<RunEvent, StoreError> {
        self.write(move |c| ops::save_checkpoint(c, &lease, &state, now_ms()))
            .await
    }

    async fn start_attempt(
        &self,
        lease: LeaseRef,
        start: AttemptStart,
    ) -> Result<RunEvent, StoreError> {
        self.write(move |c| ops::start_attempt(c, &lease, &start))
            .await
    }

    async fn finish_run(
        &self,
        lease: LeaseRef,
        outcome: Outcome,
        start: Option<AttemptStart>,
    ) -> Result<Finished, StoreError> {
        self.write(move |c| ops::finish_run(c, &lease, &outcome, start.as_ref(), now_ms()))
            .await
    }

    async fn cancel_run(&self, id: &str, now: i64) -> Result<CancelOutcome, StoreError> {
        let id = id.to_string();
        self.write(move |c| ops::cancel_run(c, &id, now).map(Ok))
            .await
    }

    async fn last_event_seq(&self, id: &str) -> Result<i64, StoreError> {
        let id = id.to_string();
        self.read(move |c| ops::last_event_seq(c, &id)).await
    }

    async fn run_links(
        &self,
        id: &str,
    ) -> Result<Option<agentry_core::runs::RunLinks>, StoreError> {
        let id = id.to_string();
        self.read(move |c| triggers::run_links(c, &id)).await
    }

    async fn log_after(
        &self,
        after: agentry_core::events::EventCursor,
        limit: usize,
        agents: Option<Vec<String>>,
    ) -> Result<agentry_core::events::LogPage, StoreError> {
        self.read(move |c| ops::log_after(c, after, limit, agents.as_deref()))
            .await
    }

    async fn events_after(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let id = id.to_string();
        self.read(move |c| ops::events_after(c, &id, after, limit))
            .await
    }

    async fn recover_leases(
        &self,
        now: i64,
        node: Option<(String, String)>,
        alive: Vec<LeaseRef>,
    ) -> Result<Vec<Finished>, StoreError> {
        self.write(move |c| ops::recover_leases(c, now, node.as_ref(), &alive).map(Ok))
            .await
    }

    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |c| ops::purge_finished(c, before, limit).map(Ok))
            .await
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.write(move |c| ops::create_key(c, &key).map(Ok)).await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.read(ops::list_keys).await
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<Option<ApiKey>, StoreError> {
        let id = id.to_string();
        self.write(move |c| ops::revoke_key(c, &id, now).map(Ok))
            .await
    }

    async fn touch_keys(&self, used: Vec<(String, i64)>) -> Result<(), StoreError> {
        self.write(move |c| ops::touch_keys(c, &used).map(Ok)).await
    }
}
