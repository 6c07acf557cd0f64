//! The callback outbox on PostgreSQL: due rows leased with SKIP LOCKED (one node delivers
//! each at a time; another takes it over once its lease has run out), attempts recorded only
//! under the lease, re-sends. The row itself is written by the run's insert statement.

use agentry_core::callbacks::{
    AttemptOutcome, Callback, DeliveryAttempt, DeliveryState, DueCallback,
};
use agentry_core::store::{CallbackStore, StoreError};
use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PgStore;
use super::runs::{db_err, get_run};

macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("queries/", $name, ".sql"))
    };
}

fn callback_from_row(row: &PgRow) -> Result<Callback, StoreError> {
    let state: String = row.try_get(2).map_err(db_err)?;
    let count = |i: usize| -> Result<u32, StoreError> {
        Ok(row.try_get::<i32, _>(i).map_err(db_err)?.max(0) as u32)
    };
    Ok(Callback {
        run_id: row.try_get(0).map_err(db_err)?,
        url: row.try_get(1).map_err(db_err)?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Internal(format!("unknown callback state {state}")))?,
        attempts: count(3)?,
        round_start: count(4)?,
        round: count(5)?,
        next_at: row.try_get(6).map_err(db_err)?,
        delivered_at: row.try_get(7).map_err(db_err)?,
    })
}

fn attempt_from_row(row: &PgRow) -> Result<DeliveryAttempt, StoreError> {
    Ok(DeliveryAttempt {
        n: row.try_get::<i32, _>(0).map_err(db_err)?.max(0) as u32,
        at: row.try_get(1).map_err(db_err)?,
        status_code: row
            .try_get::<Option<i32>, _>(2)
            .map_err(db_err)?
            .and_then(|c| u16::try_from(c).ok()),
        error: row.try_get(3).map_err(db_err)?,
        duration_ms: row.try_get(4).map_err(db_err)?,
        node: row.try_get(5).map_err(db_err)?,
    })
}

#[async_trait]
impl CallbackStore for PgStore {
    async fn claim_callbacks(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let mut c = self.pool.acquire().await.map_err(db_err)?;
        let rows = sqlx::query(sql!("claim_callbacks"))
            .bind(now)
            .bind(owner)
            .bind(lease_ms)
            .bind(limit as i64)
            .fetch_all(&mut *c)
            .await
            .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let callback = callback_from_row(row)?;
            if let Some(run) = get_run(&mut c, &callback.run_id).await? {
                out.push(DueCallback { callback, run });
            }
        }
        Ok(out)
    }

    async fn record_callback_attempt(
        &self,
        run_id: &str,
        owner: &str,
        round: u32,
        attempt: DeliveryAttempt,
        outcome: AttemptOutcome,
    ) -> Result<bool, StoreError> {
        let (state, next_at, delivered_at) = outcome.stored(attempt.at);
        let done = sqlx::query(sql!("end_callback_attempt"))
            .bind(run_id)
            .bind(owner)
            .bind(state.as_str())
            .bind(next_at)
            .bind(delivered_at)
            .bind(attempt.n as i32)
            .bind(attempt.at)
            .bind(attempt.status_code.map(i32::from))
            .bind(&attempt.error)
            .bind(attempt.duration_ms)
            .bind(&attempt.node)
            .bind(round as i32)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn get_callback(
        &self,
        run_id: &str,
    ) -> Result<Option<(Callback, Vec<DeliveryAttempt>)>, StoreError> {
        let Some(row) = sqlx::query(sql!("get_callback"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let callback = callback_from_row(&row)?;
        let attempts = sqlx::query(sql!("list_callback_attempts"))
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(attempt_from_row)
            .collect::<Result<_, _>>()?;
        Ok(Some((callback, attempts)))
    }

    async fn resend_callback(&self, run_id: &str, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(sql!("resend_callback"))
            .bind(run_id)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }
}
