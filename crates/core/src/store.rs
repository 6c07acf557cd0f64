//! The durable store behind one trait. The engine and the API use only this; each backend
//! (`agentry-store`'s `sqlite`, later `postgres`) keeps its SQL in one place and implements it.
//!
//! Every write is committed before its future resolves, so a run the API answered 202 for is on
//! disk. Writes of a running run carry its [`LeaseRef`] and are refused with
//! [`StoreError::LeaseLost`] once another claim owns it. No method holds a transaction open
//! across an agent's run: each is one short transaction.

use async_trait::async_trait;

use crate::keys::ApiKey;
use crate::nodes::{NodeRecord, NodeReport};

use crate::runs::{
    AttemptStart, CancelOutcome, ClaimRequest, Claimed, CreateOutcome, DirectClaim, Finished,
    LeaseRef, NewEvent, NewRun, Outcome, Renewal, Run, RunEvent, RunQuery,
};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot take the write or read right now (locked past the busy timeout, disk
    /// full, I/O error). Nothing was changed; the client may retry. The API answers 503.
    #[error("the run store is unavailable: {0}")]
    Unavailable(String),
    /// The run's lease belongs to another claim now; the write was refused (fencing).
    #[error("the run's lease is no longer held by this node")]
    LeaseLost,
    /// Anything else: a bug or a damaged database.
    #[error("run store failure: {0}")]
    Internal(String),
}

/// What other nodes changed in a shared store, as this node learns of it (PostgreSQL's
/// LISTEN/NOTIFY). A hint to look now rather than at the next poll: it can come late, twice,
/// or not at all (`Missed` says some may have been lost), so nothing relies on it alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// A run was queued, requeued or retried: claim what is due.
    RunsDue,
    /// A run's log grew up to `seq`.
    Events { run_id: String, seq: i64 },
    /// Someone asked to cancel a running run.
    CancelRequested { run_id: String },
    /// The channel was interrupted (a reconnect): anything may have changed meanwhile.
    Missed,
}

/// A stream of [`StoreChange`]s; it ends when the store closes.
pub type StoreChanges = futures_util::stream::BoxStream<'static, StoreChange>;

/// Durable runs, their events, checkpoints and idempotency keys.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Changes made by other nodes, for a store that several nodes share; `None` (the default)
    /// for one that only this node writes. Asked once, by the engine.
    fn changes(&self) -> Option<StoreChanges> {
        None
    }

    /// Claims `report.name` for this process at start: a name nobody holds, one whose holder
    /// stopped, or one not heard of for `gone_after_ms`. False while another live process
    /// holds it (it would requeue that one's runs). A store only one node uses has no
    /// registry: always true.
    async fn register_node(
        &self,
        _report: &NodeReport,
        _gone_after_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// This node's heartbeat: its load now. False when another process took the name over.
    async fn report_node(&self, _report: &NodeReport) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Marks this node stopped (a graceful shutdown).
    async fn node_stopped(&self, _name: &str, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Every node that registered, `gone` when silent for `gone_after_ms`; `None` for a store
    /// without a registry (the caller describes itself).
    async fn list_nodes(&self, _gone_after_ms: i64) -> Result<Option<Vec<NodeRecord>>, StoreError> {
        Ok(None)
    }

    /// Whether the database answers now (readiness). The embedded store always does.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Stores a new run (`queued`) and its `run.queued` event, honouring the idempotency key.
    /// With `claim`, a run that is due, has no concurrency key and has no due run of its agent
    /// queued ahead of it is leased at once (`running`; its code has not started yet).
    async fn create_run(
        &self,
        run: NewRun,
        claim: Option<DirectClaim>,
    ) -> Result<CreateOutcome, StoreError>;

    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError>;

    /// Runs, newest first.
    async fn list_runs(&self, query: RunQuery) -> Result<Vec<Run>, StoreError>;

    /// Leases due runs to `request.owner` (status `running`, attempt + 1, `started_at` cleared
    /// until `start_attempt`).
    /// At most one run per concurrency key runs at a time, in enqueue order.
    async fn claim_runs(&self, request: ClaimRequest) -> Result<Claimed, StoreError>;

    /// Extends the leases this node holds to `until`. With `heartbeat` set, the runs in it get
    /// a `run.heartbeat` event. Reports leases lost and cancels requested.
    async fn renew_leases(
        &self,
        leases: Vec<LeaseRef>,
        until: i64,
        heartbeat: Vec<String>,
    ) -> Result<Vec<Renewal>, StoreError>;

    /// Records that the attempt's code started: `started_at` and the `run.started` event.
    async fn start_attempt(
        &self,
        lease: LeaseRef,
        start: AttemptStart,
    ) -> Result<RunEvent, StoreError>;

    /// Appends events of a running run, in order.
    async fn append_events(
        &self,
        lease: LeaseRef,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RunEvent>, StoreError>;

    /// Saves a checkpoint (the state a retry resumes from) and its `run.checkpoint` event.
    async fn save_checkpoint(&self, lease: LeaseRef, state: String)
    -> Result<RunEvent, StoreError>;

    /// Ends the current attempt: a terminal state, or back to `queued` for a retry. With
    /// `start`, the attempt's start is recorded first, in the same commit (an attempt that ends
    /// quickly costs one write, not two).
    async fn finish_run(
        &self,
        lease: LeaseRef,
        outcome: Outcome,
        start: Option<AttemptStart>,
    ) -> Result<Finished, StoreError>;

    /// Cancels a queued run at once; marks a running one for cancellation.
    async fn cancel_run(&self, id: &str, now: i64) -> Result<CancelOutcome, StoreError>;

    /// The sequence number of the run's last event (0: none, or no such run).
    async fn last_event_seq(&self, id: &str) -> Result<i64, StoreError>;

    /// The run's links (its chain, the executor it named); `None` for a run that has none (or
    /// no such run). Read by an attempt only for agents that have named executors.
    async fn run_links(&self, id: &str) -> Result<Option<crate::runs::RunLinks>, StoreError>;

    /// The global event log (`GET /v1/events`): events of every run after `after`, in the
    /// log's order, at most `limit` looked at; only runs of `agents` when given. An event is
    /// in the log once nothing written before it can still appear (on PostgreSQL, once every
    /// transaction that started before it has ended), so a reader going on from a page's
    /// `next` never misses one.
    async fn log_after(
        &self,
        after: crate::events::EventCursor,
        limit: usize,
        agents: Option<Vec<String>>,
    ) -> Result<crate::events::LogPage, StoreError>;

    /// Events with `seq > after`, in order, at most `limit`.
    async fn events_after(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RunEvent>, StoreError>;

    /// Requeues running runs whose lease expired before `now` (their node died or hung), or
    /// that `node` held under an owner other than `keep_owner` (this node's previous life).
    /// `alive` are leases the caller knows to be held by attempts still running (its own, by
    /// its monotonic clock): never requeued, whatever `now` says (a wall clock stepped
    /// forward makes every lease look expired). Returns the runs requeued or failed, with their
    /// events.
    async fn recover_leases(
        &self,
        now: i64,
        node: Option<(String, String)>,
        alive: Vec<LeaseRef>,
    ) -> Result<Vec<Finished>, StoreError>;

    /// Deletes up to `limit` runs that finished before `before`, with their events and
    /// checkpoints. Returns how many were deleted.
    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError>;
}

/// API keys. Checking a key never reads the store: the API keeps every key in memory and
/// reloads them from here (so keys created or revoked by `agentry keys` while the server runs
/// take effect within seconds).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn create_key(&self, key: ApiKey) -> Result<(), StoreError>;

    /// Every key, revoked and expired ones included, oldest first.
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes a key; returns it as it now stands (`None`: no such key).
    async fn revoke_key(&self, id: &str, now: i64) -> Result<Option<ApiKey>, StoreError>;

    /// Records when keys were last used.
    async fn touch_keys(&self, used: Vec<(String, i64)>) -> Result<(), StoreError>;
}

/// Rate-limit buckets shared by every node of a cluster. Each node decides locally and
/// reports what it admitted here every sync interval; what comes back is every node's use.
/// A bucket is GCRA state: its theoretical arrival time (TAT), in the store's clock.
#[async_trait]
pub trait SharedBuckets: Send + Sync + 'static {
    /// Adds each bucket's charge (admitted requests × emission interval, in microseconds; 0 to
    /// only read) to its shared TAT, as `TAT = max(TAT, now) + charge`, and returns the new
    /// TATs in the order given, with the store's `now`.
    async fn charge(&self, charges: &[(String, i64)]) -> Result<SharedTats, StoreError>;

    /// Every bucket some node is drawing on: those whose TAT is ahead of the store's now (a
    /// bucket behind now is full, which is what a node assumes of one it has not seen).
    async fn in_use(&self) -> Result<InUse, StoreError>;

    /// Deletes buckets idle for longer than `idle_us` (their TAT is that far in the past).
    async fn forget_idle(&self, idle_us: i64) -> Result<u64, StoreError>;
}

/// What `SharedBuckets::charge` returns. Times are microseconds since the Unix epoch, in the
/// store's clock (one clock for every node, whatever theirs say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTats {
    pub now_us: i64,
    pub tats_us: Vec<i64>,
}

/// What `SharedBuckets::in_use` returns: bucket names and TATs, with the store's `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    pub now_us: i64,
    pub buckets: Vec<(String, i64)>,
}

/// One finished call on RunAgent's routes, as RunAgent records it in its invocation history.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub invocation_id: String,
    pub agent_id: String,
    /// `{"input_args": …, "input_kwargs": …}` as JSON text.
    pub input_data: String,
    /// The result's JSON text (success only).
    pub output_data: Option<String>,
    pub error_detail: Option<String>,
    pub request_timestamp: chrono::NaiveDateTime,
    pub response_timestamp: chrono::NaiveDateTime,
    pub execution_time_ms: f64,
    /// `completed` or `failed`.
    pub status: &'static str,
    pub entrypoint_tag: String,
    /// `local_server` (REST) or `websocket_stream`.
    pub sdk_type: &'static str,
    pub client_info: String,
}

/// RunAgent's invocation history (its `/api/v1/.../invocations` routes). Recording never
/// waits: it is off the request path, and a full queue drops history rather than slowing
/// calls. Reads see every call recorded before them. Rows are RunAgent's JSON objects.
#[async_trait]
pub trait InvocationHistory: Send + Sync + 'static {
    /// Queues a record; false when it was dropped.
    fn record(&self, invocation: Invocation) -> bool;

    /// An agent's invocations, newest first, optionally of one status.
    async fn list(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError>;

    async fn get(&self, invocation_id: &str) -> Result<Option<serde_json::Value>, StoreError>;

    /// RunAgent's counts and averages for an agent.
    async fn stats(&self, agent_id: &str) -> Result<serde_json::Value, StoreError>;

    /// Waits until everything recorded so far is stored.
    async fn flush(&self);
}

/// How a schedule write ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleWrite {
    /// Stored; the schedule as it now stands.
    Done(crate::schedules::Schedule),
    /// Another schedule of the same owner has this name; its id.
    NameTaken(String),
    /// The schedule changed since it was read (a fire, another update): read it again.
    Stale,
    /// No such schedule.
    Missing,
}

/// Decides, inside the store's transaction, what a due schedule fires: the schedule's rules
/// (`Schedule::plan`) and the runs they create.
pub type SchedulePlanner = std::sync::Arc<
    dyn Fn(&crate::schedules::DueSchedule, i64) -> crate::schedules::FirePlan + Send + Sync,
>;

/// What one schedule's fire stored.
#[derive(Debug, Clone)]
pub struct Fired {
    pub schedule: crate::schedules::Schedule,
    pub fires: Vec<crate::schedules::ScheduleFire>,
    /// The runs created, with their `run.queued` events.
    pub runs: Vec<(crate::runs::Run, crate::runs::RunEvent)>,
}

/// What `ScheduleStore::fire_due` did.
#[derive(Debug, Clone, Default)]
pub struct FireBatch {
    pub fired: Vec<Fired>,
    /// The earliest slot of an unpaused schedule of these agents still to fire, after this
    /// batch (what the caller sleeps until).
    pub next_due: Option<i64>,
    /// The batch was full: more schedules may be due now.
    pub more: bool,
}

/// Schedules and their fires. A slot fires once: `fire_due` locks the schedules it fires (or
/// skips those another node is firing), records each fire under a unique (schedule, slot)
/// key, creates the fires' runs and moves the schedules on, all in one transaction.
#[async_trait]
pub trait ScheduleStore: Send + Sync + 'static {
    async fn create_schedule(
        &self,
        schedule: crate::schedules::Schedule,
    ) -> Result<ScheduleWrite, StoreError>;

    async fn get_schedule(
        &self,
        id: &str,
    ) -> Result<Option<crate::schedules::Schedule>, StoreError>;

    /// Schedules in id order (creation order), after the cursor `after`, at most `limit`;
    /// only those of `agents` when given.
    async fn list_schedules(
        &self,
        after: Option<String>,
        agents: Option<Vec<String>>,
        limit: usize,
    ) -> Result<Vec<crate::schedules::Schedule>, StoreError>;

    /// Replaces a schedule read at `schedule.version` (the stored version becomes one more).
    async fn update_schedule(
        &self,
        schedule: crate::schedules::Schedule,
    ) -> Result<ScheduleWrite, StoreError>;

    /// Deletes a schedule and its fires; false when there was none.
    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError>;

    /// Fires the schedules of `agents` due at `now`, at most `limit` of them: `planner`
    /// decides each one's fires and next slot.
    async fn fire_due(
        &self,
        now: i64,
        node: &str,
        agents: Vec<String>,
        limit: usize,
        planner: SchedulePlanner,
    ) -> Result<FireBatch, StoreError>;

    /// Records a manual fire (`trigger`) and creates its run; `None`: no such schedule.
    async fn fire_manual(
        &self,
        id: &str,
        node: &str,
        fire: crate::schedules::NewFire,
        now: i64,
    ) -> Result<Option<Fired>, StoreError>;

    /// A schedule's fires, newest first, before the cursor `before` (a fire's `seq`).
    async fn list_fires(
        &self,
        id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<crate::schedules::ScheduleFire>, StoreError>;

    /// Deletes up to `limit` fires recorded before `before`; how many were deleted.
    async fn purge_fires(&self, before: i64, limit: usize) -> Result<usize, StoreError>;
}

/// The callback outbox (`docs/callbacks.md`). A run's row is written with the run
/// (`RunStore::create_run` of a `NewRun` with a `callback_url`); these move it along.
#[async_trait]
pub trait CallbackStore: Send + Sync + 'static {
    /// Leases to `owner`, for `lease_ms`, up to `limit` callbacks due at `now` whose runs
    /// have ended; each with its run. A shared database times leases by its own clock, not
    /// the node's (`now` is then only the node's view).
    async fn claim_callbacks(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<crate::callbacks::DueCallback>, StoreError>;

    /// Records attempt `attempt.n` of a callback `owner` leased in round `round`, and what
    /// follows it; false (nothing recorded) when the lease was
    /// lost meanwhile. A re-send made during the attempt (another round) wins over the outcome:
    /// the callback stays due.
    async fn record_callback_attempt(
        &self,
        run_id: &str,
        owner: &str,
        round: u32,
        attempt: crate::callbacks::DeliveryAttempt,
        outcome: crate::callbacks::AttemptOutcome,
    ) -> Result<bool, StoreError>;

    /// A run's callback and its attempts, oldest first; `None`: the run has none.
    async fn get_callback(
        &self,
        run_id: &str,
    ) -> Result<
        Option<(
            crate::callbacks::Callback,
            Vec<crate::callbacks::DeliveryAttempt>,
        )>,
        StoreError,
    >;

    /// Starts another round of attempts, due at `now`; false when the run has no callback.
    async fn resend_callback(&self, run_id: &str, now: i64) -> Result<bool, StoreError>;
}

/// How far each event trigger has read the global log (`docs/triggers.md`). Runs a trigger
/// creates carry the triggering event in their idempotency key, so a cursor that moves late (a
/// node that died between creating runs and saving it) never creates a run twice.
#[async_trait]
pub trait TriggerStore: Send + Sync + 'static {
    /// The trigger's cursor; a trigger not seen before starts at the log's end.
    async fn trigger_cursor(&self, name: &str) -> Result<crate::events::EventCursor, StoreError>;

    /// Moves the trigger's cursor to `cursor`, unless it is already further.
    async fn save_trigger_cursor(
        &self,
        name: &str,
        cursor: crate::events::EventCursor,
    ) -> Result<(), StoreError>;
}
