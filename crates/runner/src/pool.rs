//! The warm worker pool of one agent.
//!
//! Python runs sync code on the worker's only thread, so a sync call occupies its worker. When
//! every worker is busy, calls to entrypoints that are known to be short (their average is under
//! `pipeline_below`) may queue on a busy worker, up to `pipeline_depth`: the worker then answers a
//! batch of calls per wakeup, which is where most of the throughput comes from. Slow entrypoints
//! and streams never queue behind anything and nothing queues behind them. Async entrypoints
//! share a worker up to `max_async_per_worker`. Callers that find no worker wait in FIFO order. Every call has a deadline: past it, a
//! worker running the call alone is killed (its whole process group) and replaced; a shared
//! worker is asked to cancel the call, and killed if it does not within the grace period.
//! Dead workers are respawned with exponential backoff; a worker that keeps dying young puts the
//! agent in a reported crash loop instead of a spin.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::CallError;
use crate::protocol::{EntrypointReport, ImportFailure, Payload};
use crate::worker::{RunItem, SpawnError, StreamItem, Worker, WorkerSpec};

/// Tuning of a pool, from the configuration's `workers` and `runs` sections.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Warm workers kept for the agent.
    pub workers: usize,
    /// Async calls that may share one worker.
    pub max_async_per_worker: usize,
    /// Sync calls that may queue on one busy worker (1 disables pipelining).
    pub pipeline_depth: usize,
    /// Only entrypoints whose calls average less than this are pipelined, so that a short call
    /// never waits behind a long one.
    pub pipeline_below: Duration,
    /// Stream chunks a worker may send ahead of the consumer (backpressure window).
    pub stream_window: u32,
    /// How long a cancelled call (its client left, or its shared worker's deadline passed)
    /// may take to stop before its worker is killed.
    pub cancel_grace: Duration,
    /// The same for the call of a durable run (`runs.cancel_grace_s`).
    pub run_cancel_grace: Duration,
}

/// Why a pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{} entrypoint(s) failed to import", .0.len())]
    Import(Vec<ImportFailure>),
}

/// Chunks a stream may run ahead of its consumer at first; the window doubles from there.
const INITIAL_STREAM_CREDIT: u32 = 4;

/// A worker that lived less than this counts as an early death for crash-loop detection.
const EARLY_DEATH: Duration = Duration::from_secs(5);

/// Consecutive early deaths after which the agent is reported as crash-looping.
const CRASH_LOOP_AFTER: u32 = 5;

/// Longest wait between two respawns.
const MAX_RESPAWN_BACKOFF: Duration = Duration::from_secs(30);

/// How a call uses its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A sync unary call; `pipelined` ones may queue behind other short sync calls.
    Sync { pipelined: bool },
    /// A sync stream: the worker is its alone until it ends.
    Exclusive,
    /// An async call: shares the worker with other async calls.
    Shared,
}

struct Slot {
    worker: Option<Arc<Worker>>,
    /// Sync unary calls sent to the worker and not answered yet (run one after another).
    sync: usize,
    /// The worker runs a sync call not known to be short: nothing may queue behind it.
    pinned: bool,
    exclusive: bool,
    shared: usize,
}

impl Slot {
    fn live(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_dead())
    }

    fn busy(&self) -> bool {
        self.exclusive || self.sync > 0 || self.shared > 0
    }

    fn reset(&mut self) {
        self.sync = 0;
        self.pinned = false;
        self.exclusive = false;
        self.shared = 0;
    }
}

struct Waiter {
    mode: Mode,
    tx: oneshot::Sender<Lease>,
}

struct PoolState {
    slots: Vec<Slot>,
    waiters: VecDeque<Waiter>,
    closing: bool,
    crash_loop: Option<String>,
}

struct PoolInner {
    spec: WorkerSpec,
    config: PoolConfig,
    entrypoints: HashMap<String, EntrypointReport>,
    /// Average duration of each entrypoint's unary calls, in microseconds (u64::MAX: unknown).
    averages: HashMap<String, AtomicU64>,
    state: Mutex<PoolState>,
    /// Signalled whenever a worker becomes idle (for graceful shutdown).
    idle: Notify,
}

/// The pool of one agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<PoolInner>,
}

/// The right to run one call on one worker; released on drop.
struct Lease {
    pool: Arc<PoolInner>,
    slot: usize,
    worker: Arc<Worker>,
    mode: Mode,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.slot, &self.worker, self.mode);
    }
}

impl AgentPool {
    /// Starts `config.workers` workers and waits until all are warm. Import errors of the agent
    /// fail the start with every failing entrypoint named.
    pub async fn start(spec: WorkerSpec, config: PoolConfig) -> Result<Self, StartError> {
        let n = config.workers.max(1);
        let spawns = (0..n).map(|_| Worker::spawn(&spec));
        let results = futures_util::future::join_all(spawns).await;
        let mut workers = Vec::with_capacity(n);
        let mut first_err = None;
        for r in results {
            match r {
                Ok(w) => workers.push(w),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(w) = workers.iter().find(|w| !w.hello.errors.is_empty()) {
            let errors = w.hello.errors.clone();
            for w in &workers {
                w.kill("start-up failed");
            }
            return Err(StartError::Import(errors));
        }
        if let Some(e) = first_err {
            for w in &workers {
                w.kill("start-up failed");
            }
            return Err(StartError::Spawn(e));
        }
        let entrypoints = workers[0]
            .hello
            .entrypoints
            .iter()
            .map(|e| (e.tag.clone(), e.clone()))
            .collect();
        let slots = workers
            .iter()
            .map(|w| Slot {
                worker: Some(Arc::clone(w)),
                sync: 0,
                pinned: false,
                exclusive: false,
                shared: 0,
            })
            .collect();
        let averages = workers[0]
            .hello
            .entrypoints
            .iter()
            .map(|e| (e.tag.clone(), AtomicU64::new(u64::MAX)))
            .collect();
        let inner = Arc::new(PoolInner {
            spec,
            config,
            entrypoints,
            averages,
            state: Mutex::new(PoolState {
                slots,
                waiters: VecDeque::new(),
                closing: false,
                crash_loop: None,
            }),
            idle: Notify::new(),
        });
        for (slot, worker) in workers.into_iter().enumerate() {
            tokio::spawn(supervise(Arc::clone(&inner), slot, worker));
        }
        Ok(Self { inner })
    }

    /// What the workers reported about each entrypoint (kind, schema, docs).
    pub fn entrypoint(&self, tag: &str) -> Option<&EntrypointReport> {
        self.inner.entrypoints.get(tag)
    }

    /// The interpreter version and executable the workers run.
    pub fn spec(&self) -> &WorkerSpec {
        &self.inner.spec
    }

    /// Live (warm) workers right now.
    pub fn live_workers(&self) -> usize {
        let state = self.inner.state.lock();
        state
            .slots
            .iter()
            .filter(|s| s.worker.as_ref().is_some_and(|w| !w.is_dead()))
            .count()
    }

    /// PIDs of the live workers (for operators and tests).
    pub fn worker_pids(&self) -> Vec<i32> {
        let state = self.inner.state.lock();
        state
            .slots
            .iter()
            .filter_map(|s| s.worker.as_ref().map(|w| w.pid))
            .collect()
    }

    /// Set while the agent's workers keep dying young.
    pub fn crash_loop(&self) -> Option<String> {
        self.inner.state.lock().crash_loop.clone()
    }

    /// Runs a unary call and returns its result.
    pub async fn call(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Payload, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mode = self.mode(tag, false)?;
        let lease = self.inner.acquire(mode, deadline, timeout).await?;
        let sent = std::time::Instant::now();
        let (id, rx) = lease
            .worker
            .start_unary(tag, args, kwargs, mode != Mode::Shared)?;
        let mut pending = PendingUnary {
            lease: Some(lease),
            id,
            rx: Some(rx),
            deadline,
            timeout,
            grace: self.inner.config.cancel_grace,
        };
        let result = pending.wait().await;
        if !matches!(result, Err(CallError::Timeout(_) | CallError::Crashed(_))) {
            self.inner.observe(tag, sent.elapsed());
        }
        result
    }

    /// Starts a streaming call; chunks arrive through the returned stream.
    pub async fn stream(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<CallStream, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mode = self.mode(tag, true)?;
        let lease = self.inner.acquire(mode, deadline, timeout).await?;
        let max_window = self.inner.config.stream_window.max(2);
        let window = INITIAL_STREAM_CREDIT.min(max_window);
        let (id, rx) = lease
            .worker
            .start_stream(tag, args, kwargs, window, max_window)?;
        Ok(CallStream {
            lease: Some(lease),
            id,
            rx,
            deadline,
            timeout,
            window,
            max_window,
            consumed: 0,
            finished: false,
            total: None,
            grace: self.inner.config.cancel_grace,
        })
    }

    /// Starts the call of a durable run: `kwargs` is the input object's JSON text and `context`
    /// the run context's (`{"id", "attempt", "state"}`). The deadline starts once a worker took
    /// the call; waiting for a worker is bounded by the same duration.
    pub async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<RunCall, CallError> {
        let stream = self.inner.entrypoints.get(tag).is_some_and(|e| e.stream);
        let mode = self.mode(tag, stream)?;
        let wait_until = tokio::time::Instant::now() + timeout;
        let lease = self.inner.acquire(mode, wait_until, timeout).await?;
        let window = if stream {
            self.inner.config.stream_window.max(2)
        } else {
            0
        };
        let sync = matches!(mode, Mode::Sync { .. });
        let (id, rx) = lease
            .worker
            .start_run(tag, "[]", kwargs, window, context, sync)?;
        Ok(RunCall {
            lease: Some(lease),
            id,
            rx,
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            window,
            consumed: 0,
            finished: false,
            sent: std::time::Instant::now(),
            tag: tag.to_string(),
            grace: self.inner.config.run_cancel_grace,
        })
    }

    /// How a call to `tag` uses its worker: async calls share one; a sync stream has its worker
    /// alone; a sync unary call may be pipelined when the entrypoint is known to be short.
    fn mode(&self, tag: &str, stream: bool) -> Result<Mode, CallError> {
        let report = self
            .inner
            .entrypoints
            .get(tag)
            .ok_or_else(|| CallError::NoSuchEntrypoint(tag.to_string()))?;
        Ok(match (report.is_async(), stream) {
            (true, _) => Mode::Shared,
            (false, true) => Mode::Exclusive,
            (false, false) => Mode::Sync {
                pipelined: self.inner.is_short(tag),
            },
        })
    }

    /// Stops taking calls, lets in-flight calls finish within `grace`, then stops every worker.
    pub async fn shutdown(&self, grace: Duration) {
        let waiters: Vec<Waiter> = {
            let mut state = self.inner.state.lock();
            state.closing = true;
            state.waiters.drain(..).collect()
        };
        drop(waiters); // their callers see the channel close and answer "shutting down"
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.inner.idle.notified();
            let busy = {
                let state = self.inner.state.lock();
                state.slots.iter().any(|s| s.live() && s.busy())
            };
            if !busy || tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let workers: Vec<Arc<Worker>> = {
            let state = self.inner.state.lock();
            state
                .slots
                .iter()
                .filter_map(|s| s.worker.clone())
                .collect()
        };
        for w in &workers {
            w.close();
        }
        // A worker stuck in a sync call never reads the quit frame: the group kill ends it.
        let stop_by = tokio::time::Instant::now() + Duration::from_millis(300);
        for w in &workers {
            let _ = tokio::time::timeout_at(stop_by, w.wait_dead()).await;
            w.kill("the server is shutting down");
        }
        for w in &workers {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.wait_dead()).await;
        }
    }
}

impl PoolInner {
    /// Whether calls to `tag` are known to be short enough to queue behind each other.
    fn is_short(&self, tag: &str) -> bool {
        self.config.pipeline_depth > 1
            && self.averages.get(tag).is_some_and(|a| {
                a.load(Ordering::Relaxed) < self.config.pipeline_below.as_micros() as u64
            })
    }

    /// Folds one call's duration into its entrypoint's moving average.
    fn observe(&self, tag: &str, took: Duration) {
        if let Some(avg) = self.averages.get(tag) {
            let sample = took.as_micros().min(u128::from(u32::MAX)) as u64;
            let old = avg.load(Ordering::Relaxed);
            let new = if old == u64::MAX {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            avg.store(new, Ordering::Relaxed);
        }
    }

    async fn acquire(
        self: &Arc<Self>,
        mode: Mode,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Lease, CallError> {
        let rx = {
            let mut state = self.state.lock();
            if state.closing {
                return Err(CallError::Unavailable("the server is shutting down".into()));
            }
            if state.waiters.is_empty()
                && let Some(lease) = self.try_assign(&mut state, mode)
            {
                return Ok(lease);
            }
            let any_live = state.slots.iter().any(Slot::live);
            if !any_live && let Some(why) = &state.crash_loop {
                return Err(CallError::Unavailable(format!(
                    "agent {} has no live worker: {why}",
                    self.spec.agent
                )));
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(Waiter { mode, tx });
            rx
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(_)) => Err(CallError::Unavailable("the server is shutting down".into())),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    fn try_assign(self: &Arc<Self>, state: &mut PoolState, mode: Mode) -> Option<Lease> {
        let max_shared = self.config.max_async_per_worker.max(1);
        let depth = self.config.pipeline_depth.max(1);
        let candidates = state
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live() && !s.exclusive);
        let pick = match mode {
            // An idle worker first; else, for short calls, the least-loaded pipeline.
            Mode::Sync { pipelined } => candidates
                .filter(|(_, s)| {
                    s.shared == 0 && (s.sync == 0 || (pipelined && !s.pinned && s.sync < depth))
                })
                .min_by_key(|(_, s)| s.sync)
                .map(|(i, _)| i),
            Mode::Exclusive => candidates
                .filter(|(_, s)| s.shared == 0 && s.sync == 0)
                .map(|(i, _)| i)
                .next(),
            Mode::Shared => candidates
                .filter(|(_, s)| s.sync == 0 && s.shared < max_shared)
                .min_by_key(|(_, s)| s.shared)
                .map(|(i, _)| i),
        }?;
        let slot = &mut state.slots[pick];
        match mode {
            Mode::Sync { pipelined } => {
                slot.sync += 1;
                slot.pinned |= !pipelined;
            }
            Mode::Exclusive => slot.exclusive = true,
            Mode::Shared => slot.shared += 1,
        }
        Some(Lease {
            pool: Arc::clone(self),
            slot: pick,
            worker: Arc::clone(slot.worker.as_ref()?),
            mode,
        })
    }

    fn release(self: &Arc<Self>, slot: usize, worker: &Arc<Worker>, mode: Mode) {
        let (handoffs, closing) = {
            let mut state = self.state.lock();
            let Some(s) = state.slots.get_mut(slot) else {
                return;
            };
            if s.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, worker)) {
                match mode {
                    Mode::Sync { pipelined } => {
                        s.sync = s.sync.saturating_sub(1);
                        if !pipelined {
                            s.pinned = false;
                        }
                    }
                    Mode::Exclusive => s.exclusive = false,
                    Mode::Shared => s.shared = s.shared.saturating_sub(1),
                }
            }
            let handoffs = if state.waiters.is_empty() {
                Vec::new()
            } else {
                self.hand_to_waiters(&mut state)
            };
            (handoffs, state.closing)
        };
        if closing {
            self.idle.notify_waiters();
        }
        deliver(handoffs);
    }

    /// Pairs waiting callers with free workers, in arrival order. A waiter that cannot be served
    /// yet keeps its place, and so do those behind it that want the same kind of worker.
    fn hand_to_waiters(
        self: &Arc<Self>,
        state: &mut PoolState,
    ) -> Vec<(oneshot::Sender<Lease>, Lease)> {
        let mut out = Vec::new();
        let mut blocked: Vec<Mode> = Vec::new();
        let mut i = 0;
        while i < state.waiters.len() {
            if state.waiters[i].tx.is_closed() {
                state.waiters.remove(i);
                continue;
            }
            let mode = state.waiters[i].mode;
            if !blocked.contains(&mode)
                && let Some(lease) = self.try_assign(state, mode)
            {
                if let Some(w) = state.waiters.remove(i) {
                    out.push((w.tx, lease));
                }
                continue;
            }
            if !blocked.contains(&mode) {
                blocked.push(mode);
            }
            if blocked.len() >= 4 {
                break;
            }
            i += 1;
        }
        out
    }
}

fn deliver(handoffs: Vec<(oneshot::Sender<Lease>, Lease)>) {
    for (tx, lease) in handoffs {
        // A caller that gave up in the meantime hands the lease straight back (via its drop).
        let _ = tx.send(lease);
    }
}

/// Keeps one slot staffed: waits for its worker to die, then respawns with backoff.
async fn supervise(pool: Arc<PoolInner>, slot: usize, mut worker: Arc<Worker>) {
    let mut early_deaths: u32 = 0;
    loop {
        let reason = worker.wait_dead().await;
        let lived = worker.started_at.elapsed();
        {
            let mut state = pool.state.lock();
            if let Some(s) = state.slots.get_mut(slot) {
                s.worker = None;
                s.reset();
            }
            if state.closing {
                return;
            }
        }
        pool.idle.notify_waiters();
        tracing::warn!(agent.name = %pool.spec.agent, worker.pid = worker.pid, "worker died: {reason}; respawning");
        early_deaths = if lived < EARLY_DEATH {
            early_deaths + 1
        } else {
            0
        };
        let mut last_error = reason;
        loop {
            if early_deaths >= CRASH_LOOP_AFTER {
                let mut state = pool.state.lock();
                if state.crash_loop.is_none() {
                    tracing::error!(
                        agent.name = %pool.spec.agent,
                        "agent is crash-looping: {early_deaths} workers in a row died within {EARLY_DEATH:?} (last: {last_error}); still retrying with backoff"
                    );
                }
                state.crash_loop = Some(format!(
                    "{early_deaths} workers in a row died young (last: {last_error})"
                ));
            }
            let backoff = Duration::from_millis(100)
                .saturating_mul(1u32 << early_deaths.min(16))
                .min(MAX_RESPAWN_BACKOFF);
            if early_deaths > 0 {
                tokio::time::sleep(backoff).await;
            }
            if pool.state.lock().closing {
                return;
            }
            match Worker::spawn(&pool.spec).await {
                Ok(w) if w.hello.errors.is_empty() => {
                    worker = w;
                    break;
                }
                Ok(w) => {
                    let e = &w.hello.errors[0];
                    last_error = format!(
                        "entrypoint {} ({}) failed to import: {}: {}",
                        e.tag, e.r#where, e.r#type, e.message
                    );
                }
                Err(e) => last_error = e.to_string(),
            }
            tracing::warn!(agent.name = %pool.spec.agent, "worker respawn failed: {last_error}");
            early_deaths += 1;
        }
        let handoffs = {
            let mut state = pool.state.lock();
            if state.closing {
                worker.kill("the server is shutting down");
                return;
            }
            if let Some(s) = state.slots.get_mut(slot) {
                s.worker = Some(Arc::clone(&worker));
                s.reset();
            }
            if state.crash_loop.take().is_some() {
                tracing::info!(agent.name = %pool.spec.agent, "a worker started again after a crash loop");
            }
            pool.hand_to_waiters(&mut state)
        };
        deliver(handoffs);
    }
}

/// Deals with a call that ran past its deadline.
fn expire(lease: Lease, id: u32, timeout: Duration, grace: Duration) {
    let running = match lease.mode {
        Mode::Exclusive => true,
        // Sync calls run in the order sent: only the first unanswered one is running.
        Mode::Sync { .. } => lease.worker.is_running_first(id),
        Mode::Shared => false,
    };
    if running {
        lease.worker.forget(id);
        lease
            .worker
            .kill(format!("a call ran past its deadline of {timeout:?}"));
    } else if matches!(lease.mode, Mode::Sync { .. }) {
        // Still queued behind another call: answer the caller now; the worker skips it.
        lease.worker.cancel(id);
        lease.worker.forget(id);
    } else {
        // Other calls share this worker: ask for a cancel, kill only if it does not happen.
        lease.worker.cancel(id);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still_running = !lease.worker.is_dead() && lease.worker_has(id);
            if still_running {
                lease.worker.kill(format!(
                    "a call ignored its cancellation after its deadline of {timeout:?}"
                ));
            }
            drop(lease);
        });
    }
}

impl Lease {
    fn worker_has(&self, id: u32) -> bool {
        self.worker.has_call(id)
    }
}

struct PendingUnary {
    lease: Option<Lease>,
    id: u32,
    rx: Option<oneshot::Receiver<Result<Payload, CallError>>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    grace: Duration,
}

impl PendingUnary {
    async fn wait(&mut self) -> Result<Payload, CallError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(CallError::Cancelled);
        };
        let outcome = tokio::time::timeout_at(self.deadline, rx).await;
        self.rx = None;
        let lease = self.lease.take();
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Crashed("the worker went away".into())),
            Err(_) => {
                if let Some(lease) = lease {
                    expire(lease, self.id, self.timeout, self.grace);
                }
                Err(CallError::Timeout(self.timeout))
            }
        }
    }
}

impl Drop for PendingUnary {
    /// The caller went away (its HTTP client disconnected) while the call runs. The worker stays
    /// leased until the call ends, so that no other call is queued behind it; async calls are
    /// cancelled, sync ones run to completion or to their deadline.
    fn drop(&mut self) {
        let (Some(rx), Some(lease)) = (self.rx.take(), self.lease.take()) else {
            return;
        };
        let (id, deadline, timeout, grace) = (self.id, self.deadline, self.timeout, self.grace);
        if lease.mode == Mode::Shared {
            lease.worker.cancel(id);
        }
        tokio::spawn(async move {
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                expire(lease, id, timeout, grace);
            }
        });
    }
}

/// A streaming call in progress. Dropping it before the end cancels the call in the worker.
pub struct CallStream {
    lease: Option<Lease>,
    id: u32,
    rx: mpsc::Receiver<StreamItem>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    /// Chunks the worker may currently run ahead (starts small, grows to `max_window`).
    window: u32,
    max_window: u32,
    consumed: u32,
    finished: bool,
    total: Option<u32>,
    grace: Duration,
}

impl CallStream {
    /// The next chunk; `None` once the stream ended normally.
    pub async fn next(&mut self) -> Option<Result<Payload, CallError>> {
        if self.finished {
            return None;
        }
        let item = tokio::time::timeout_at(self.deadline, self.rx.recv()).await;
        match item {
            Ok(Some(StreamItem::Chunk(payload))) => {
                self.consumed += 1;
                if self.consumed >= self.window.div_ceil(2)
                    && let Some(lease) = &self.lease
                {
                    // Give back what was consumed, and while the consumer keeps up, double the
                    // window (slow start): a generator cannot flood a slow client, and a fast
                    // one does not hog the CPU the first chunk needs to reach the client.
                    let growth = self.window.min(self.max_window - self.window);
                    self.window += growth;
                    lease.worker.grant(self.id, self.consumed + growth);
                    self.consumed = 0;
                }
                Some(Ok(payload))
            }
            Ok(Some(StreamItem::End(count))) => {
                self.finish();
                self.total = Some(count);
                None
            }
            Ok(Some(StreamItem::Failed(e))) => {
                self.finish();
                Some(Err(e))
            }
            Ok(None) => {
                self.finish();
                Some(Err(CallError::Crashed("the worker went away".into())))
            }
            Err(_) => {
                self.finished = true;
                if let Some(lease) = self.lease.take() {
                    expire(lease, self.id, self.timeout, self.grace);
                }
                Some(Err(CallError::Timeout(self.timeout)))
            }
        }
    }

    /// Chunks the worker reported, once the stream has ended.
    pub fn total(&self) -> Option<u32> {
        self.total
    }

    fn finish(&mut self) {
        self.finished = true;
        self.lease = None;
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(lease) = self.lease.take() else {
            return;
        };
        let id = self.id;
        let grace = self.grace;
        lease.worker.cancel(id);
        let mut rx = std::mem::replace(&mut self.rx, mpsc::channel(1).1);
        tokio::spawn(async move {
            let stopped = tokio::time::timeout(grace, async {
                while let Some(item) = rx.recv().await {
                    if !matches!(item, StreamItem::Chunk(_)) {
                        return;
                    }
                }
            })
            .await;
            if stopped.is_err() {
                lease
                    .worker
                    .kill("a cancelled stream did not stop within its grace period".to_string());
            }
            drop(lease);
        });
    }
}

/// The call of a durable run in progress: chunks, context messages, then one terminal item.
/// Dropping it before the end cancels the call.
pub struct RunCall {
    lease: Option<Lease>,
    id: u32,
    rx: mpsc::UnboundedReceiver<RunItem>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    window: u32,
    consumed: u32,
    finished: bool,
    sent: std::time::Instant,
    tag: String,
    grace: Duration,
}

impl RunCall {
    /// The next item; after a terminal one (`Result`, `End`, `Failed`), `None`. Past the
    /// deadline the call's worker is stopped and the item is `Failed(Timeout)`.
    pub async fn next(&mut self) -> Option<RunItem> {
        if self.finished {
            return None;
        }
        let item = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => RunItem::Failed(CallError::Crashed("the worker went away".into())),
            Err(_) => {
                self.finished = true;
                if let Some(lease) = self.lease.take() {
                    expire(lease, self.id, self.timeout, self.grace);
                }
                return Some(RunItem::Failed(CallError::Timeout(self.timeout)));
            }
        };
        match &item {
            RunItem::Chunk(_) => {
                self.consumed += 1;
                if self.consumed >= self.window.div_ceil(2)
                    && let Some(lease) = &self.lease
                {
                    lease.worker.grant(self.id, self.consumed);
                    self.consumed = 0;
                }
            }
            RunItem::Result(_) | RunItem::End(_) | RunItem::Failed(_) => {
                self.finished = true;
                if let Some(lease) = self.lease.take() {
                    if matches!(item, RunItem::Result(_)) {
                        lease.pool.observe(&self.tag, self.sent.elapsed());
                    }
                }
            }
            _ => {}
        }
        Some(item)
    }

    /// Lets the agent go on after a checkpoint, telling it whether the checkpoint was saved.
    pub fn ack(&self, saved: bool) {
        if let Some(lease) = &self.lease {
            lease.worker.ack(self.id, saved);
        }
    }

    /// Asks the agent to stop (`ctx.cancelled` turns true; an async call is cancelled).
    pub fn cancel(&self) {
        if let Some(lease) = &self.lease {
            lease.worker.cancel(self.id);
        }
    }

    /// Stops the call now: a worker running it is killed (with its process group), a call still
    /// queued behind another is skipped.
    pub fn kill(&mut self, reason: &str) {
        self.finished = true;
        let Some(lease) = self.lease.take() else {
            return;
        };
        let running = match lease.mode {
            Mode::Sync { .. } => lease.worker.is_running_first(self.id),
            Mode::Exclusive | Mode::Shared => lease.worker.has_call(self.id),
        };
        if running {
            lease.worker.forget(self.id);
            lease.worker.kill(reason.to_string());
        } else {
            lease.worker.cancel(self.id);
            lease.worker.forget(self.id);
        }
    }
}

impl Drop for RunCall {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(lease) = self.lease.take() else {
            return;
        };
        let (id, timeout, grace) = (self.id, self.timeout, self.grace);
        lease.worker.cancel(id);
        let mut rx = std::mem::replace(&mut self.rx, mpsc::unbounded_channel().1);
        tokio::spawn(async move {
            let stopped = tokio::time::timeout(grace, async {
                while let Some(item) = rx.recv().await {
                    match item {
                        RunItem::Result(_) | RunItem::End(_) | RunItem::Failed(_) => return,
                        // Nobody will save it; let the agent go on to its cancellation.
                        RunItem::Checkpoint(_) => lease.worker.ack(id, false),
                        _ => {}
                    }
                }
            })
            .await;
            if stopped.is_err() {
                expire(lease, id, timeout, grace);
            }
        });
    }
}
