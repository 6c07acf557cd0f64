//! The warm worker pool of one agent, the first implementation of `AgentExecutor`.
//!
//! * `slots`: which worker takes a call (pipelining short sync calls, sharing workers between
//!   async calls, FIFO waiters).
//! * `calls`: a call in flight: its deadline, its credit window, and what happens when its
//!   caller goes away.
//! * `supervise`: respawning dead workers with backoff, and reporting crash loops.
//!
//! Every call has a deadline: past it, a worker running the call alone is killed (its whole
//! process group) and replaced; a shared worker is asked to cancel the call, and killed if it
//! does not within the grace period.

mod calls;
mod slots;
mod supervise;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use agentry_core::executor::{
    AgentExecutor, CallError, ChunkStream, EntrypointReport, Health, Payload, RunCall as RunCallApi,
};
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

pub use calls::{CallStream, RunCall};
use calls::{Credit, InFlight, PendingUnary};
pub use slots::PoolConfig;
use slots::{Mode, PoolInner, PoolState, Slot, Waiter};

use crate::protocol::ImportFailure;
use crate::worker::{SpawnError, Worker, WorkerSpec};

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

/// The pool of one agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<PoolInner>,
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
            tokio::spawn(supervise::supervise(Arc::clone(&inner), slot, worker));
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
        let lease = self.inner.acquire(mode, Some((deadline, timeout))).await?;
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
        let lease = self.inner.acquire(mode, Some((deadline, timeout))).await?;
        let credit = Credit::new(
            INITIAL_STREAM_CREDIT,
            self.inner.config.stream_window.max(2),
        );
        let (id, rx) = lease
            .worker
            .start_stream(tag, args, kwargs, credit.window, credit.max)?;
        let grace = self.inner.config.cancel_grace;
        Ok(CallStream::new(InFlight::new(
            lease, id, rx, deadline, timeout, grace, credit,
        )))
    }

    /// Starts the call of a durable run: `kwargs` is the input object's JSON text and `context`
    /// the run context's (`{"id", "attempt", "state"}`). The deadline starts once a worker took
    /// the call: waiting for a worker is not running. The wait has no bound of its own (the
    /// engine leases only what the workers can start soon, and drops this future to stop it).
    pub async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<RunCall, CallError> {
        let stream = self.inner.entrypoints.get(tag).is_some_and(|e| e.stream);
        let mode = self.mode(tag, stream)?;
        let lease = self.inner.acquire(mode, None).await?;
        // Every run gets a window: its chunks, events and log lines all use it up.
        let window = self.inner.config.stream_window.max(2);
        let sync = matches!(mode, Mode::Sync { .. });
        let (id, rx) = lease
            .worker
            .start_run(tag, "[]", kwargs, window, context, sync)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let grace = self.inner.config.run_cancel_grace;
        let credit = Credit::new(window, window);
        Ok(RunCall::new(
            InFlight::new(lease, id, rx, deadline, timeout, grace, credit),
            tag,
        ))
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

/// Pipelines' worth of short runs leased per worker: enough that the workers never idle between
/// two claims, few enough that the last of them starts within about a second (each is under
/// `pipeline_below`).
const SHORT_RUNS_PER_WORKER: usize = 16;

#[async_trait]
impl AgentExecutor for AgentPool {
    fn entrypoint(&self, tag: &str) -> Option<&EntrypointReport> {
        AgentPool::entrypoint(self, tag)
    }

    async fn call(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Payload, CallError> {
        AgentPool::call(self, tag, args, kwargs, timeout).await
    }

    async fn stream(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Box<dyn ChunkStream>, CallError> {
        let stream = AgentPool::stream(self, tag, args, kwargs, timeout).await?;
        Ok(Box::new(stream))
    }

    async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<Box<dyn RunCallApi>, CallError> {
        let call = AgentPool::run(self, tag, kwargs, context, timeout).await?;
        Ok(Box::new(call))
    }

    fn health(&self) -> Health {
        Health {
            live_workers: self.live_workers(),
            crash_loop: self.crash_loop(),
        }
    }

    /// What the workers can start soon: every worker's async calls for an agent whose
    /// entrypoints are all async; otherwise a queue of `SHORT_RUNS_PER_WORKER` pipelines per
    /// worker once every entrypoint that has run is known to be short (those pipeline,
    /// milliseconds each), else two per worker (the one running and the next, so that no
    /// claim round trip idles it).
    fn run_capacity(&self) -> usize {
        // No live worker (a crash loop): lease nothing, so that queued runs keep their
        // attempts until a worker is back, instead of failing one after another.
        let live = self.live_workers();
        let config = &self.inner.config;
        // Only when every entrypoint is async do all of a worker's calls start at once; an
        // agent that mixes in sync ones gets the sync rule (its sync runs would wait in turn).
        if self
            .inner
            .entrypoints
            .values()
            .all(EntrypointReport::is_async)
        {
            return live * config.max_async_per_worker.max(1);
        }
        let mut observed = self
            .inner
            .averages
            .iter()
            .filter(|(_, avg)| avg.load(std::sync::atomic::Ordering::Relaxed) != u64::MAX)
            .map(|(tag, _)| tag)
            .peekable();
        let all_short = observed.peek().is_some() && observed.all(|tag| self.inner.is_short(tag));
        if all_short {
            live * config.pipeline_depth.max(1) * SHORT_RUNS_PER_WORKER
        } else {
            live * 2
        }
    }

    async fn drain(&self, grace: Duration) {
        self.shutdown(grace).await;
    }
}
