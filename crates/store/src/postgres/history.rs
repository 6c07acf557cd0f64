//! RunAgent's invocation history in the run store's PostgreSQL database: every node on it
//! records there, so RunAgent's history routes on any node list every node's calls. The
//! batching writer is RunAgent's database's (`crate::runagent`); only the SQL differs. The
//! `agents` rows RunAgent's SDKs discover servers through stay in each node's own RunAgent
//! database, and their counters are kept there too when it is open.

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use crate::runagent::{
    EncodedBatch, HistoryBackend, HistoryBounds, RunAgentDb, TIMESTAMP, invocation_json_from,
    stats_json,
};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

/// The history in PostgreSQL (migration 0007), with this node's RunAgent database for the
/// `agents` counters.
#[derive(Clone)]
pub struct PgHistory {
    pool: PgPool,
    local: Option<RunAgentDb>,
}

impl PgHistory {
    pub(crate) fn from_pool(pool: PgPool) -> Self {
        Self { pool, local: None }
    }

    /// Also counts the calls in this node's RunAgent database (its `agents` rows).
    pub fn with_local(mut self, local: Option<RunAgentDb>) -> Self {
        self.local = local;
        self
    }
}

fn row_json(row: &PgRow) -> Value {
    invocation_json_from(
        &|i| row.try_get::<Option<String>, _>(i).ok().flatten(),
        row.try_get::<Option<f64>, _>(7).ok().flatten(),
    )
}

#[async_trait]
impl HistoryBackend for PgHistory {
    async fn write(&self, batch: &EncodedBatch) -> Result<(), sqlx::Error> {
        sqlx::query(sql!("history_insert"))
            .bind(batch.rows_json.as_str())
            .execute(&self.pool)
            .await?;
        if let Some(local) = &self.local
            && let Err(e) = local.add_counters(&batch.counters).await
        {
            tracing::debug!("could not count calls in RunAgent's database: {e}");
        }
        Ok(())
    }

    async fn prune(&self, bounds: &HistoryBounds, limit: i64) -> Result<u64, sqlx::Error> {
        let mut deleted = 0;
        if let Some(max_rows) = bounds.max_rows {
            deleted += sqlx::query(sql!("history_prune_rows"))
                .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
                .bind(&bounds.agents)
                .bind(limit)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        if let Some(max_age) = bounds.max_age {
            let cutoff = Utc::now().naive_utc()
                - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
            deleted += sqlx::query(sql!("history_prune_age"))
                .bind(cutoff.format(TIMESTAMP).to_string())
                .bind(&bounds.agents)
                .bind(limit)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    async fn list(
        &self,
        agent_id: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, sqlx::Error> {
        let rows = sqlx::query(sql!("history_list"))
            .bind(agent_id)
            .bind(status)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(row_json).collect())
    }

    async fn get(&self, invocation_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let row = sqlx::query(sql!("history_get"))
            .bind(invocation_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(row_json))
    }

    async fn stats(&self, agent_id: &str) -> Result<Value, sqlx::Error> {
        let row = sqlx::query(sql!("history_stats"))
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?;
        let counts = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        Ok(stats_json(agent_id, counts, row.try_get(4)?))
    }
}
