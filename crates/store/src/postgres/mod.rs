//! PostgreSQL: the run store and API keys of several nodes (`runs`), and the rate-limit buckets
//! they share (`SharedBuckets`, here). The SQL is in `queries/`, one statement per file.

mod batch;
mod callbacks;
mod history;
mod nodes;
mod runs;
mod schedules;
mod triggers;

pub use history::PgHistory;
pub use runs::{MIGRATIONS, MigrationState, PgOptions, PgStore};

use agentry_core::{InUse, SharedBuckets, SharedTats, StoreError};
use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::HashMap;
use std::time::Duration;

const SCHEMA_LOCK: &str = include_str!("queries/schema_lock.sql");
const SCHEMA: &str = include_str!("queries/schema.sql");
const CHARGE: &str = include_str!("queries/charge_buckets.sql");
const FORGET_IDLE: &str = include_str!("queries/forget_idle_buckets.sql");
const IN_USE: &str = include_str!("queries/buckets_in_use.sql");

/// Shared rate-limit buckets in PostgreSQL.
pub struct PgBuckets {
    pool: PgPool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl PgBuckets {
    /// Buckets in a migrated run-store database (migration 0004 made the table).
    pub(crate) fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connects (a small pool: one sync every interval is all the traffic) and creates the
    /// table if it is missing. `url` is a `postgres://` URL; it is never logged.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        let mut tx = pool.begin().await.map_err(unavailable)?;
        sqlx::query(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::raw_sql(SCHEMA)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl SharedBuckets for PgBuckets {
    async fn charge(&self, charges: &[(String, i64)]) -> Result<SharedTats, StoreError> {
        if charges.is_empty() {
            return Ok(SharedTats {
                now_us: 0,
                tats_us: Vec::new(),
            });
        }
        let mut sorted: Vec<&(String, i64)> = charges.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        let names: Vec<&str> = sorted.iter().map(|(n, _)| n.as_str()).collect();
        let amounts: Vec<i64> = sorted.iter().map(|(_, c)| *c).collect();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(CHARGE)
            .bind(&names)
            .bind(&amounts)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let now_us = rows.first().map_or(0, |r| r.2);
        let by_name: HashMap<&str, i64> = rows.iter().map(|(n, t, _)| (n.as_str(), *t)).collect();
        Ok(SharedTats {
            now_us,
            tats_us: charges
                .iter()
                .map(|(n, _)| by_name.get(n.as_str()).copied().unwrap_or(now_us))
                .collect(),
        })
    }

    async fn in_use(&self) -> Result<InUse, StoreError> {
        let rows: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(IN_USE)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(InUse {
            now_us: rows.first().map_or(0, |r| r.0),
            buckets: rows
                .into_iter()
                .filter_map(|(_, name, tat)| Some((name?, tat?)))
                .collect(),
        })
    }

    async fn forget_idle(&self, idle_us: i64) -> Result<u64, StoreError> {
        sqlx::query(FORGET_IDLE)
            .bind(idle_us)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(unavailable)
    }
}
