//! Event triggers' cursors on SQLite (`TriggerStore`); the runs' links are written by
//! `create_run`, in the run's commit.

use agentry_core::events::EventCursor;
use agentry_core::store::{StoreError, TriggerStore};
use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::SqliteStore;

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

/// Writes a run's chain, in the run's commit.
pub(super) fn insert_link(
    c: &Connection,
    run: &agentry_core::runs::NewRun,
) -> rusqlite::Result<()> {
    if run.is_linked() {
        c.prepare_cached(sql!("insert_run_link"))?.execute(params![
            run.id,
            run.correlation_id,
            run.depth,
            run.parent_run_id,
            run.executor
        ])?;
    }
    Ok(())
}

pub(super) fn run_links(
    c: &Connection,
    run_id: &str,
) -> rusqlite::Result<Option<agentry_core::runs::RunLinks>> {
    use rusqlite::OptionalExtension;
    c.prepare_cached(sql!("run_links"))?
        .query_row(params![run_id], |r| {
            Ok(agentry_core::runs::RunLinks {
                correlation_id: r.get(0)?,
                depth: r.get(1)?,
                parent_run_id: r.get(2)?,
                executor: r.get(3)?,
            })
        })
        .optional()
}

pub(super) fn purge_link(c: &Connection, run_id: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql!("purge_run_links"))?
        .execute(params![run_id])?;
    Ok(())
}

#[async_trait]
impl TriggerStore for SqliteStore {
    async fn trigger_cursor(&self, name: &str) -> Result<EventCursor, StoreError> {
        let name = name.to_string();
        self.write(move |c| {
            let (tx, gseq): (i64, i64) = c
                .prepare_cached(sql!("trigger_cursor"))?
                .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(Ok(EventCursor {
                tx: tx.max(0) as u64,
                gseq,
            }))
        })
        .await
    }

    async fn save_trigger_cursor(&self, name: &str, cursor: EventCursor) -> Result<(), StoreError> {
        let name = name.to_string();
        self.write(move |c| {
            c.prepare_cached(sql!("save_trigger_cursor"))?
                .execute(params![name, cursor.tx as i64, cursor.gseq])?;
            Ok(Ok(()))
        })
        .await
    }
}
