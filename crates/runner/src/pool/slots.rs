//! Which worker takes a call: the slots (one per warm worker) and what each is running, the
//! callers waiting in FIFO order, and the lease that holds a worker for one call.
//!
//! Python runs sync code on the worker's only thread, so a sync call occupies its worker. When
//! every worker is busy, calls to entrypoints known to be short (their average is under
//! `pipeline_below`) may queue on a busy worker, up to `pipeline_depth`, so that the worker
//! answers a batch per wakeup. Slow entrypoints and streams never queue behind anything and
//! nothing queues behind them. Async entrypoints share a worker up to `max_async_per_worker`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentry_core::executor::{CallError, EntrypointReport};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use crate::worker::{Worker, WorkerSpec};

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

/// How a call uses its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A sync unary call; `pipelined` ones may queue behind other short sync calls.
    Sync { pipelined: bool },
    /// A sync stream: the worker is its alone until it ends.
    Exclusive,
    /// An async call: shares the worker with other async calls.
    Shared,
}

pub(super) struct Slot {
    pub(super) worker: Option<Arc<Worker>>,
    /// Sync unary calls sent to the worker and not answered yet (run one after another).
    pub(super) sync: usize,
    /// The worker runs a sync call not known to be short: nothing may queue behind it.
    pub(super) pinned: bool,
    pub(super) exclusive: bool,
    pub(super) shared: usize,
}

impl Slot {
    pub(super) fn live(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_dead())
    }

    pub(super) fn busy(&self) -> bool {
        self.exclusive || self.sync > 0 || self.shared > 0
    }

    pub(super) fn reset(&mut self) {
        self.sync = 0;
        self.pinned = false;
        self.exclusive = false;
        self.shared = 0;
    }
}

pub(super) struct Waiter {
    pub(super) mode: Mode,
    pub(super) tx: oneshot::Sender<Lease>,
}

pub(super) struct PoolState {
    pub(super) slots: Vec<Slot>,
    pub(super) waiters: VecDeque<Waiter>,
    pub(super) closing: bool,
    pub(super) crash_loop: Option<String>,
}

pub(super) struct PoolInner {
    pub(super) spec: WorkerSpec,
    pub(super) config: PoolConfig,
    pub(super) entrypoints: HashMap<String, EntrypointReport>,
    /// Average duration of each entrypoint's unary calls, in microseconds (u64::MAX: unknown).
    pub(super) averages: HashMap<String, AtomicU64>,
    pub(super) state: Mutex<PoolState>,
    /// Signalled whenever a worker becomes idle (for graceful shutdown).
    pub(super) idle: Notify,
}

/// The right to run one call on one worker; released on drop.
pub(super) struct Lease {
    pub(super) pool: Arc<PoolInner>,
    pub(super) slot: usize,
    pub(super) worker: Arc<Worker>,
    pub(super) mode: Mode,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.slot, &self.worker, self.mode);
    }
}

impl PoolInner {
    /// Whether calls to `tag` are known to be short enough to queue behind each other.
    pub(super) fn is_short(&self, tag: &str) -> bool {
        self.config.pipeline_depth > 1
            && self.averages.get(tag).is_some_and(|a| {
                a.load(Ordering::Relaxed) < self.config.pipeline_below.as_micros() as u64
            })
    }

    /// Folds one call's duration into its entrypoint's moving average.
    pub(super) fn observe(&self, tag: &str, took: Duration) {
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

    /// A worker for one call, in FIFO order with the other waiters. A direct call waits at most
    /// until its `deadline` (its timeout counts from the request); a durable run waits with no
    /// deadline (`None`): its timeout counts from when its code starts, and the engine stops
    /// the wait by dropping this future when the run is cancelled or abandoned.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        mode: Mode,
        deadline: Option<(tokio::time::Instant, Duration)>,
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
        // A waiter let go without a worker: the pool is closing, or crash-looping with none live.
        let shutting_down = || match self.state.lock().crash_loop.clone() {
            Some(why) => CallError::Unavailable(format!(
                "agent {} has no live worker: {why}",
                self.spec.agent
            )),
            None => CallError::Unavailable("the server is shutting down".into()),
        };
        match deadline {
            Some((deadline, timeout)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(lease)) => Ok(lease),
                Ok(Err(_)) => Err(shutting_down()),
                Err(_) => Err(CallError::Timeout(timeout)),
            },
            None => rx.await.map_err(|_| shutting_down()),
        }
    }

    pub(super) fn try_assign(self: &Arc<Self>, state: &mut PoolState, mode: Mode) -> Option<Lease> {
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

    pub(super) fn release(self: &Arc<Self>, slot: usize, worker: &Arc<Worker>, mode: Mode) {
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
    pub(super) fn hand_to_waiters(
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

pub(super) fn deliver(handoffs: Vec<(oneshot::Sender<Lease>, Lease)>) {
    for (tx, lease) in handoffs {
        // A caller that gave up in the meantime hands the lease straight back (via its drop).
        let _ = tx.send(lease);
    }
}
