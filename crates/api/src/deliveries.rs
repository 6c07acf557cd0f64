//! A run's callback over HTTP (`docs/callbacks.md`): where it stands and every attempt
//! (`GET /v1/runs/{id}/deliveries`), and a re-send (`POST`), which starts another round of
//! attempts. Who may see the run may see its deliveries; who may write runs may re-send.

use std::sync::Arc;

use agentry_core::ErrorCode;
use agentry_core::callbacks::{Callback, DeliveryAttempt};
use agentry_core::runs::now_ms;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, principal};
use crate::error::ApiError;
use crate::runs::find_run;
use crate::state::AppState;
use crate::views::{ErrorEnvelope, rfc3339};

type S = Arc<AppState>;

/// One attempt to deliver a callback.
#[derive(Serialize, ToSchema)]
pub(crate) struct AttemptView {
    /// 1, 2, 3, … across re-sends.
    n: u32,
    at: Option<String>,
    /// The receiver's status; null when no answer came.
    status_code: Option<u16>,
    /// Why it failed, when it did (a non-2xx answer, a timeout, a refused private address).
    error: Option<String>,
    duration_ms: i64,
    node: String,
}

/// A run's callback.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeliveriesView {
    run_id: String,
    callback_url: String,
    /// `pending` (the run has not ended, or an attempt is due), `delivered` or `failed`.
    state: &'static str,
    /// When the next attempt is due, while pending after a failed one.
    next_attempt_at: Option<String>,
    delivered_at: Option<String>,
    attempts: Vec<AttemptView>,
}

fn view(c: Callback, attempts: Vec<DeliveryAttempt>) -> DeliveriesView {
    DeliveriesView {
        state: c.state.as_str(),
        next_attempt_at: (c.state == agentry_core::callbacks::DeliveryState::Pending
            && c.attempts > c.round_start)
            .then(|| rfc3339(c.next_at))
            .flatten(),
        delivered_at: c.delivered_at.and_then(rfc3339),
        run_id: c.run_id,
        callback_url: c.url,
        attempts: attempts
            .into_iter()
            .map(|a| AttemptView {
                n: a.n,
                at: rfc3339(a.at),
                status_code: a.status_code,
                error: a.error,
                duration_ms: a.duration_ms,
                node: a.node,
            })
            .collect(),
    }
}

fn no_callback(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::RunNotFound,
        format!("run `{id}` was created without a callback_url"),
    )
}

/// The run's callback as shown (the caller checked that it may see the run).
async fn read(state: &S, id: &str) -> Result<DeliveriesView, ApiError> {
    let (callback, attempts) = state
        .callbacks
        .get_callback(id)
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| no_callback(id))?;
    Ok(view(callback, attempts))
}

/// A run's callback: its state and every attempt.
#[utoipa::path(get, path = "/v1/runs/{id}/deliveries", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The callback and its attempts", body = DeliveriesView),
        (status = 404, description = "`run_not_found`: no such run, or one without a callback", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_deliveries(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    find_run(&state, &principal(caller), &id).await?;
    Ok(Json(read(&state, &id).await?).into_response())
}

/// Re-send a run's callback: another round of attempts, starting now (once the run has ended).
#[utoipa::path(post, path = "/v1/runs/{id}/deliveries", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "A new round was started", body = DeliveriesView),
        (status = 404, description = "`run_not_found`: no such run, or one without a callback", body = ErrorEnvelope),
    ))]
pub(crate) async fn resend_delivery(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    find_run(&state, &who, &id).await?;
    if !state
        .callbacks
        .resend_callback(&id, now_ms())
        .await
        .map_err(ApiError::from_store)?
    {
        return Err(no_callback(&id));
    }
    Ok((StatusCode::ACCEPTED, Json(read(&state, &id).await?)).into_response())
}
