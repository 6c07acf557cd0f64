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
    /// On a pool of its own (two connections, to the run store's database and schema): the
    /// history's reads and prunes never take the connections lease renewals need.
    pub(crate) fn beside(runs: &PgPool) -> Self {
        let options = (*runs.connect_options()).clone();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy_with(options);
        Self { pool, local: None }
    }

    /// Also counts the calls in this node's RunAgent database (its `agents` rows).
    pub fn with_local(mut self, local: Option<RunAgentDb>) -> Self {
        self.local = local;
        self
    }
}

/// The rows' JSON with every U+0000 removed from its strings (decoded first: the text
/// `\u0000` may also be an escaped backslash followed by `u0000`, which stays).
fn strip_nul(rows_json: &str) -> String {
    fn strip(v: &mut Value) {
        match v {
            Value::String(s) => s.retain(|c| c != '\0'),
            Value::Array(a) => a.iter_mut().for_each(strip),
            Value::Object(o) => o.values_mut().for_each(strip),
            _ => {}
        }
    }
    match serde_json::from_str::<Value>(rows_json) {
        Ok(mut v) => {
            strip(&mut v);
            v.to_string()
        }
        Err(_) => rows_json.to_string(),
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
        // PostgreSQL's text cannot hold U+0000 (an agent's error may carry one): without it.
        let without_nul;
        let rows = if batch.rows_json.contains("\\u0000") {
            without_nul = strip_nul(&batch.rows_json);
            without_nul.as_str()
        } else {
            batch.rows_json.as_str()
        };
        sqlx::query(sql!("history_insert"))
            .bind(rows)
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentry_core::Invocation;

    /// A call whose error carries U+0000 is recorded (without it), and so is the rest of its
    /// batch; an escaped backslash before `u0000` is kept as it was.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_nul_in_a_call_costs_neither_it_nor_its_batch() {
        let schema = format!("agentry_ut_{}", uuid::Uuid::new_v4().simple());
        let store = crate::PgStore::connect(&crate::PgOptions {
            url: std::env::var("AGENTRY_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            max_connections: 4,
            acquire_timeout: std::time::Duration::from_secs(5),
            batches_in_flight: 1,
            schema: Some(schema.clone()),
        })
        .await
        .expect("PostgreSQL (start it: .ci/run does)");
        let history = store.shared_history();
        let now = Utc::now().naive_utc();
        let call = |id: &str, error: Option<&str>| Invocation {
            invocation_id: id.into(),
            agent_id: "agent".into(),
            input_data: "{}".into(),
            output_data: None,
            error_detail: error.map(Into::into),
            request_timestamp: now,
            response_timestamp: now,
            execution_time_ms: 1.0,
            status: "failed",
            entrypoint_tag: "e".into(),
            sdk_type: "local_server",
            client_info: "{}".into(),
        };
        let batch = crate::runagent::encode_batch(vec![
            call("with-nul", Some("bad\0byte")),
            call("escaped", Some("a \\u0000 b")),
            call("plain", None),
        ]);
        history.write(&batch).await.expect("the batch is written");
        let listed = history.list("agent", None, 10).await.expect("list");
        assert_eq!(listed.len(), 3, "{listed:?}");
        let error_of = |id: &str| {
            listed
                .iter()
                .find(|v| v["invocation_id"] == id)
                .map(|v| v["error_detail"].clone())
        };
        assert_eq!(error_of("with-nul"), Some(Value::from("badbyte")));
        assert_eq!(error_of("escaped"), Some(Value::from("a \\u0000 b")));
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(store.pool())
            .await;
    }
}
