//! Event triggers' cursors on PostgreSQL (`TriggerStore`); the runs' links are written by the
//! runs' insert statement.

use agentry_core::events::EventCursor;
use agentry_core::store::{StoreError, TriggerStore};
use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use super::runs::db_err;

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

#[async_trait]
impl TriggerStore for PgStore {
    async fn trigger_cursor(&self, name: &str) -> Result<EventCursor, StoreError> {
        let row = sqlx::query(sql!("trigger_cursor"))
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(EventCursor {
            tx: row.try_get::<i64, _>(0).map_err(db_err)?.max(0) as u64,
            gseq: row.try_get(1).map_err(db_err)?,
        })
    }

    async fn save_trigger_cursor(&self, name: &str, cursor: EventCursor) -> Result<(), StoreError> {
        sqlx::query(sql!("save_trigger_cursor"))
            .bind(name)
            .bind(i64::try_from(cursor.tx).unwrap_or(i64::MAX))
            .bind(cursor.gseq)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}
