//! What the engine counts for `/metrics`: plain atomics bumped where the engine already is
//! (a claim, an attempt's end, a lost lease), read at scrape time. Nothing here allocates
//! on the execution path.

use std::sync::atomic::{AtomicU64, Ordering};

use agentry_core::runs::RunStatus;

/// Monotonic counters of this process's engine.
#[derive(Debug, Default)]
pub struct EngineCounters {
    claimed: AtomicU64,
    /// Attempts whose end was recorded, by the run's status afterwards (`queued` for one that
    /// will be retried), indexed like `RunStatus::ALL`.
    ended: [AtomicU64; RunStatus::ALL.len()],
    leases_lost: AtomicU64,
}

/// A reading of [`EngineCounters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub claimed: u64,
    pub ended: Vec<(RunStatus, u64)>,
    pub leases_lost: u64,
}

impl EngineCounters {
    pub(crate) fn claimed(&self, n: usize) {
        self.claimed.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, status: RunStatus) {
        if let Some(i) = RunStatus::ALL.iter().position(|s| *s == status) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn lease_lost(&self) {
        self.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            claimed: self.claimed.load(Ordering::Relaxed),
            ended: RunStatus::ALL
                .iter()
                .zip(&self.ended)
                .map(|(s, n)| (*s, n.load(Ordering::Relaxed)))
                .collect(),
            leases_lost: self.leases_lost.load(Ordering::Relaxed),
        }
    }
}
