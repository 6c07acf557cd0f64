//! The callback outbox on SQLite: leases, attempts and re-sends, each one job of the writer
//! thread. The row itself is written by `create_run`, in the run's commit.

use agentry_core::callbacks::{
    AttemptOutcome, Callback, DeliveryAttempt, DeliveryState, DueCallback,
};
use agentry_core::store::{CallbackStore, StoreError};
use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{SqliteStore, ops};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn callback_from_row(row: &Row<'_>) -> rusqlite::Result<Callback> {
    let state: String = row.get(2)?;
    Ok(Callback {
        run_id: row.get(0)?,
        url: row.get(1)?,
        state: DeliveryState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                2,
                Type::Text,
                format!("unknown callback state {state}").into(),
            )
        })?,
        attempts: row.get(3)?,
        round_start: row.get(4)?,
        round: row.get(5)?,
        next_at: row.get(6)?,
        delivered_at: row.get(7)?,
    })
}

fn attempt_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        n: row.get(0)?,
        at: row.get(1)?,
        status_code: row.get(2)?,
        error: row.get(3)?,
        duration_ms: row.get(4)?,
        node: row.get(5)?,
    })
}

/// Writes a new run's outbox row (inside `create_run`'s job).
pub(super) fn insert(c: &Connection, run_id: &str, url: &str, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(sql!("insert_callback"))?
        .execute(params![run_id, url, now])?;
    Ok(())
}

/// Deletes a purged run's outbox row and attempts.
pub(super) fn purge(c: &Connection, run_id: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql!("purge_callback_attempts"))?
        .execute(params![run_id])?;
    c.prepare_cached(sql!("purge_callbacks"))?
        .execute(params![run_id])?;
    Ok(())
}

#[async_trait]
impl CallbackStore for SqliteStore {
    async fn claim_callbacks(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let owner = owner.to_string();
        let lease_until = now.saturating_add(lease_ms);
        self.write(move |c| {
            let ids: Vec<String> = c
                .prepare_cached(sql!("due_callbacks"))?
                .query_map(params![now, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let callback = c
                    .prepare_cached(sql!("lease_callback"))?
                    .query_row(params![id, owner, lease_until], callback_from_row)?;
                if let Some(run) = ops::get_run(c, &id)? {
                    out.push(DueCallback { callback, run });
                }
            }
            Ok(Ok(out))
        })
        .await
    }

    async fn record_callback_attempt(
        &self,
        run_id: &str,
        owner: &str,
        round: u32,
        attempt: DeliveryAttempt,
        outcome: AttemptOutcome,
    ) -> Result<bool, StoreError> {
        let (run_id, owner) = (run_id.to_string(), owner.to_string());
        self.write(move |c| {
            let (state, next_at, delivered_at) = outcome.stored(attempt.at);
            let held = c
                .prepare_cached(sql!("end_callback_attempt"))?
                .execute(params![
                    run_id,
                    owner,
                    state.as_str(),
                    next_at,
                    delivered_at,
                    round,
                    attempt.at
                ])?
                == 1;
            if held {
                c.prepare_cached(sql!("insert_callback_attempt"))?
                    .execute(params![
                        run_id,
                        attempt.n,
                        attempt.at,
                        attempt.status_code,
                        attempt.error,
                        attempt.duration_ms,
                        attempt.node
                    ])?;
            }
            Ok(Ok(held))
        })
        .await
    }

    async fn get_callback(
        &self,
        run_id: &str,
    ) -> Result<Option<(Callback, Vec<DeliveryAttempt>)>, StoreError> {
        let run_id = run_id.to_string();
        self.read(move |c| {
            let Some(callback) = c
                .prepare_cached(sql!("get_callback"))?
                .query_row(params![run_id], callback_from_row)
                .optional()?
            else {
                return Ok(None);
            };
            let attempts = c
                .prepare_cached(sql!("list_callback_attempts"))?
                .query_map(params![run_id], attempt_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some((callback, attempts)))
        })
        .await
    }

    async fn resend_callback(&self, run_id: &str, now: i64) -> Result<bool, StoreError> {
        let run_id = run_id.to_string();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql!("resend_callback"))?
                .execute(params![run_id, now])?;
            Ok(Ok(n == 1))
        })
        .await
    }
}
