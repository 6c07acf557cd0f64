//! The node registry on PostgreSQL (`agentry_nodes`): names taken at start, heartbeats,
//! graceful stops and the list `GET /v1/nodes` shows.

use agentry_core::StoreError;
use agentry_core::nodes::{NodeRecord, NodeReport, NodeRole, NodeStatus};
use sqlx::{PgPool, Row};

use super::runs::db_err;

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) async fn register(
    pool: &PgPool,
    report: &NodeReport,
    gone_after_ms: i64,
) -> Result<bool, StoreError> {
    sqlx::query(sql!("forget_nodes"))
        .execute(pool)
        .await
        .map_err(db_err)?;
    let taken: Option<String> = sqlx::query_scalar(sql!("register_node"))
        .bind(&report.name)
        .bind(&report.owner)
        .bind(report.role.as_str())
        .bind(&report.version)
        .bind(&report.agents)
        .bind(count(report.capacity))
        .bind(gone_after_ms)
        .bind(&report.home)
        .bind(gone_after_ms)
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    Ok(taken.is_some())
}

pub(super) async fn report(pool: &PgPool, report: &NodeReport) -> Result<bool, StoreError> {
    let done = sqlx::query(sql!("report_node"))
        .bind(&report.name)
        .bind(&report.owner)
        .bind(count(report.running))
        .bind(count(report.capacity))
        .bind(&report.agents)
        .execute(pool)
        .await
        .map_err(db_err)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn stopped(pool: &PgPool, name: &str, owner: &str) -> Result<(), StoreError> {
    sqlx::query(sql!("node_stopped"))
        .bind(name)
        .bind(owner)
        .execute(pool)
        .await
        .map_err(db_err)?;
    Ok(())
}

pub(super) async fn list(pool: &PgPool, gone_after_ms: i64) -> Result<Vec<NodeRecord>, StoreError> {
    let rows = sqlx::query(sql!("list_nodes"))
        .fetch_all(pool)
        .await
        .map_err(db_err)?;
    rows.iter()
        .map(|row| {
            let field = |e: sqlx::Error| StoreError::Internal(format!("agentry_nodes: {e}"));
            let role: String = row.try_get("role").map_err(field)?;
            let last_seen_at: i64 = row.try_get("last_seen").map_err(field)?;
            let stopped_at: Option<i64> = row.try_get("stopped_at").map_err(field)?;
            let now_ms: i64 = row.try_get("now_ms").map_err(field)?;
            let status = if stopped_at.is_some() {
                NodeStatus::Stopped
            } else if now_ms - last_seen_at > gone_after_ms {
                NodeStatus::Gone
            } else {
                NodeStatus::Up
            };
            let capacity: i64 = row.try_get("capacity").map_err(field)?;
            let running: i64 = row.try_get("running").map_err(field)?;
            Ok(NodeRecord {
                report: NodeReport {
                    name: row.try_get("name").map_err(field)?,
                    owner: row.try_get("owner").map_err(field)?,
                    home: String::new(),
                    role: NodeRole::parse(&role).unwrap_or_default(),
                    version: row.try_get("version").map_err(field)?,
                    agents: row.try_get("agents").map_err(field)?,
                    capacity: usize::try_from(capacity).unwrap_or(0),
                    running: if status == NodeStatus::Up {
                        usize::try_from(running).unwrap_or(0)
                    } else {
                        0
                    },
                },
                started_at: row.try_get("started_at").map_err(field)?,
                last_seen_at,
                status,
            })
        })
        .collect()
}
