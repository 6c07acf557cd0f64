//! The event triggers of one node (`docs/triggers.md`): it reads the global event log from the
//! oldest cursor of its triggers, creates a run for every event a trigger fires on, then moves
//! the cursors. A run's idempotency key names its trigger and the triggering event, so nodes
//! that read the same events (several serve the agent, or one restarted before it saved its
//! cursor) create each run once. No leader: every node serving a trigger's agent reads.
//!
//! A triggered run joins its source's chain (the same correlation id), one deeper; an event of
//! a run at `triggers.max_depth` triggers nothing, so a cycle of triggers stops.

use std::sync::Arc;

use agentry_core::events::{EventCursor, LoggedEvent};
use agentry_core::runs::{NewRun, now_ms};
use agentry_core::settings::{RunsConfig, TriggersConfig, WorkersConfig};
use agentry_core::store::{StoreError, TriggerStore};
use agentry_core::triggers::EventTrigger;

use crate::{Engine, SubmitError};

/// Events read from the log at once.
const PAGE: usize = 500;

/// What the trigger loop needs besides the store: the checks of a new run and the bounds.
pub struct TriggerSettings {
    pub workers: WorkersConfig,
    pub runs: RunsConfig,
    pub triggers: TriggersConfig,
}

struct Triggers {
    engine: Engine,
    store: Arc<dyn TriggerStore>,
    triggers: Vec<EventTrigger>,
    settings: TriggerSettings,
}

/// Starts this node's trigger loop for `triggers` (those of agents it serves); it stops with
/// the engine. Nothing starts without triggers. The cursors are read (a new trigger's set at
/// the log's end) before this returns, so that what happens once the node serves is seen.
pub async fn start_triggers(
    engine: &Engine,
    store: Arc<dyn TriggerStore>,
    triggers: Vec<EventTrigger>,
    settings: TriggerSettings,
) -> Result<(), StoreError> {
    if triggers.is_empty() {
        return Ok(());
    }
    let t = Triggers {
        engine: engine.clone(),
        store,
        triggers,
        settings,
    };
    let cursors = t.load_cursors().await?;
    engine
        .inner
        .tasks
        .lock()
        .spawn(async move { t.run(cursors).await });
    Ok(())
}

impl Triggers {
    async fn run(self, mut cursors: Vec<EventCursor>) {
        let poll = self.settings.triggers.poll();
        loop {
            match self.step(&mut cursors).await {
                Ok(true) => continue, // a full page: read on at once
                Ok(false) => {}
                Err(e) => tracing::warn!("event triggers: {e}"),
            }
            tokio::time::sleep(poll).await;
        }
    }

    async fn load_cursors(&self) -> Result<Vec<EventCursor>, StoreError> {
        let mut out = Vec::with_capacity(self.triggers.len());
        for t in &self.triggers {
            out.push(self.store.trigger_cursor(&t.cursor).await?);
        }
        Ok(out)
    }

    /// Reads one page from the oldest cursor, starts what it triggers, saves the cursors that
    /// moved. True when the page was full (more may be waiting).
    async fn step(&self, cursors: &mut [EventCursor]) -> Result<bool, StoreError> {
        let Some(from) = cursors.iter().min().copied() else {
            return Ok(false);
        };
        let page = self.engine.store().log_after(from, PAGE, None).await?;
        let full = page.events.len() == PAGE;
        for (t, cursor) in self.triggers.iter().zip(cursors.iter_mut()) {
            let mut moved = false;
            let read_to = *cursor;
            for e in page.events.iter().filter(|e| e.cursor > read_to) {
                if t.fires_on(e) {
                    self.start(t, e).await?;
                }
                *cursor = e.cursor;
                moved = true;
            }
            if page.next > *cursor {
                *cursor = page.next;
                moved = true;
            }
            if moved {
                self.store.save_trigger_cursor(&t.cursor, *cursor).await?;
            }
        }
        Ok(full)
    }

    /// Creates the run `e` triggers. A store failure is returned (the event is read again);
    /// a run refused (a depth past the bound, an input the entrypoint rejects) is logged and
    /// skipped, since reading it again would refuse it again.
    async fn start(&self, t: &EventTrigger, e: &LoggedEvent) -> Result<(), StoreError> {
        let max_depth = self.settings.triggers.max_depth;
        if e.depth >= max_depth {
            tracing::warn!(
                trigger = %t.name,
                run_id = %e.event.run_id,
                depth = e.depth,
                "event trigger not fired: the chain reached triggers.max_depth ({max_depth})"
            );
            return Ok(());
        }
        let input = t.input(e);
        let key = t.idempotency_key(e);
        let request = t.run_request(e, &input, &key);
        let mut run = match NewRun::build(
            &request,
            self.engine.agents(),
            &self.settings.workers,
            &self.settings.runs,
            now_ms(),
        ) {
            Ok(run) => run,
            Err(rejection) => {
                tracing::warn!(trigger = %t.name, run_id = %e.event.run_id, ?rejection,
                    "event trigger not fired: its entrypoint refuses the run");
                return Ok(());
            }
        };
        run.depth = e.depth + 1;
        run.parent_run_id = Some(e.event.run_id.clone());
        match self.engine.submit(run).await {
            Ok((created, fresh)) => {
                if fresh {
                    tracing::debug!(trigger = %t.name, run_id = %created.id,
                        source = %e.event.run_id, "event trigger fired");
                }
                Ok(())
            }
            // Only ever this trigger's key for this event: the run exists already.
            Err(SubmitError::Conflict(_)) => Ok(()),
            Err(SubmitError::Store(e)) => Err(e),
        }
    }
}
