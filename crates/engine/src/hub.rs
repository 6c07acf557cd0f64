//! Live fan-out of committed run events to the clients following a run (SSE, WebSocket, wait).
//!
//! Only events already committed are published, so a client that subscribes first and then
//! reads the log from the store sees every event: those before its read from the store, those
//! after from here (duplicates are dropped by sequence number). A subscriber that falls behind
//! loses live messages (`Lagged`) and fills the gap from the store. Events written by another
//! node come as a poke (from the store's change stream): the followers re-read the store.

use std::collections::HashMap;
use std::sync::Arc;

use agentry_core::runs::{Run, RunEvent};
use parking_lot::Mutex;
use tokio::sync::broadcast;

/// A committed event, with the run as it stands after it when the event changed its status.
#[derive(Debug, Clone)]
pub struct Published {
    pub event: Arc<RunEvent>,
    pub run: Option<Arc<Run>>,
}

/// What a follower hears.
#[derive(Debug, Clone)]
enum Live {
    Event(Published),
    /// The log grew elsewhere (another node): read it from the store.
    Poke,
}

/// One followed run: its channel, and the last event published here.
struct Followed {
    tx: broadcast::Sender<Live>,
    last_seq: i64,
}

/// Subscribers by run id.
#[derive(Default)]
pub struct EventHub {
    runs: Mutex<HashMap<String, Followed>>,
}

/// A live feed of one run's events. Unsubscribes on drop.
pub struct Subscription {
    hub: Arc<EventHub>,
    run_id: String,
    rx: Option<broadcast::Receiver<Live>>,
}

impl EventHub {
    pub fn subscribe(self: &Arc<Self>, run_id: &str) -> Subscription {
        let mut runs = self.runs.lock();
        let followed = runs.entry(run_id.to_string()).or_insert_with(|| Followed {
            tx: broadcast::channel(256).0,
            last_seq: 0,
        });
        Subscription {
            hub: Arc::clone(self),
            run_id: run_id.to_string(),
            rx: Some(followed.tx.subscribe()),
        }
    }

    /// Publishes committed events; a no-op for runs nobody follows.
    pub fn publish(&self, events: &[RunEvent], run: Option<&Run>) {
        let mut runs = self.runs.lock();
        let Some(first) = events.first() else { return };
        let Some(followed) = runs.get_mut(&first.run_id) else {
            return;
        };
        let run = run.map(|r| Arc::new(r.clone()));
        for (i, e) in events.iter().enumerate() {
            let last = i + 1 == events.len();
            followed.last_seq = followed.last_seq.max(e.seq);
            let _ = followed.tx.send(Live::Event(Published {
                event: Arc::new(e.clone()),
                run: if last { run.clone() } else { None },
            }));
        }
    }

    /// The run's log grew to `seq` in the store (another node wrote it): its followers re-read
    /// the store, unless this node published that far already.
    pub fn poke(&self, run_id: &str, seq: i64) {
        if let Some(followed) = self.runs.lock().get(run_id)
            && seq > followed.last_seq
        {
            let _ = followed.tx.send(Live::Poke);
        }
    }

    /// Every follower re-reads the store (changes may have been missed).
    pub fn poke_all(&self) {
        for followed in self.runs.lock().values() {
            let _ = followed.tx.send(Live::Poke);
        }
    }

    /// Runs with at least one follower (for tests and metrics).
    pub fn followed(&self) -> usize {
        self.runs.lock().len()
    }
}

impl Subscription {
    /// The next live event. `Err(n)`: events were missed (`n` of them, or 0 for a poke: an
    /// unknown number, written elsewhere); read them from the store. `Ok(None)`: the hub is gone.
    pub async fn recv(&mut self) -> Result<Option<Published>, u64> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(None);
        };
        match rx.recv().await {
            Ok(Live::Event(p)) => Ok(Some(p)),
            Ok(Live::Poke) => Err(0),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
            Err(broadcast::error::RecvError::Closed) => Ok(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        let mut runs = self.hub.runs.lock();
        if runs
            .get(&self.run_id)
            .is_some_and(|f| f.tx.receiver_count() == 0)
        {
            runs.remove(&self.run_id);
        }
    }
}
